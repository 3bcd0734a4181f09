# Qwen at 16-32K: dumps of training and held-out prompts (prompt-window labels, layer masses)
set -o pipefail
# environment: PYTHONPATH with the package and the gguf wheel, qwen2.5-coder-0.5b staged (see ../indexer_feedback_h200/)
T0=$(date +%s)
W=$HOME/ql; mkdir -p $W/p $W/d $OUT
python3 ../indexer_feedback_h200/split_prompts.py qwen_long.jsonl.gz $W/p 8
PIDS=()
run() { timeout ${LIMIT:-430} flashmemory dump --model qwen2.5-coder-0.5b --data $1 --out $2 --max-new-tokens 128 --shard-size 4 --target-layers 13 --device cuda > $2.log 2>&1 & PIDS+=($!); }
for i in 0 1 2 3 4 5 6 7; do run $W/p/train$i.jsonl $W/d/t$i; run $W/p/eval$i.jsonl $W/d/e$i; done
wait ${PIDS[@]}
echo "dump $(( $(date +%s)-T0 )) s"
for f in $W/d/*.log; do echo "$f: $(tail -c 300 $f | tr '\r' '\n' | grep -v '^$' | tail -1)"; done
python3 -c "
import json, glob
n = s = 0; lens = []
for f in glob.glob('$W/d/*/manifest.json'):
    d = json.load(open(f)); n += len(d['prompts']); s += sum(p['num_steps'] for p in d['prompts']); lens += [p['prompt_tokens'] for p in d['prompts']]
print('prompts', n, 'steps', s, 'tokens', min(lens), max(lens))"
nvidia-smi --query-gpu=memory.used --format=csv
