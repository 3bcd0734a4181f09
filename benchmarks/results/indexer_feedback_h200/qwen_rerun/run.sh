# Qwen: held-out dumps again (same prompts), indexer-eval with the runtime's alternating page choice, planted facts end to end
set -o pipefail
source .gpu/fb/env.sh
T0=$(date +%s)
bash .gpu/fb/qwen_setup.sh || exit 1
echo "setup $(( $(date +%s)-T0 )) s"
W=$HOME/fb2; mkdir -p $W/pq $OUT/r
python3 .gpu/fb/fb_split.py .gpu/fb/qwen_train.jsonl.gz $W/pq 6
PIDS=()
for i in 0 1 2 3 4 5; do
  timeout 230 flashmemory dump --model qwen2.5-coder-0.5b --data $W/pq/eval$i.jsonl --out $W/e$i --max-new-tokens 128 --shard-size 8 --target-layers 13 --device cuda > $W/e$i.log 2>&1 & PIDS+=($!)
done
timeout 330 python3 benchmarks/planted_fact_eval.py --model qwen2.5-coder-0.5b --lengths 8192,16384 --budget 0.15 --samples 6 --seed 200 --ckpt src/flashmemory/checkpoints/qwen2.5-coder-0.5b --ckpt .gpu/fb/qwen-feedback --max-new-tokens 16 --out $OUT/r/pf_qwen > $OUT/r/pf_qwen.log 2>&1 &
PF=$!
wait ${PIDS[@]}
echo "dump $(( $(date +%s)-T0 )) s"
EQ=$(for i in 0 1 2 3 4 5; do echo -n "-d $W/e$i "; done)
timeout 110 flashmemory indexer-eval $EQ --ckpt .gpu/fb/qwen-feedback -o $OUT/r/eval_qwen > $OUT/r/eval_qwen.log 2>&1 &
timeout 110 flashmemory indexer-eval $EQ --ckpt .gpu/fb/qwen-feedback --steps boundary -o $OUT/r/eval_qwen_boundary > $OUT/r/eval_qwen_b.log 2>&1 &
wait
echo "eval $(( $(date +%s)-T0 )) s"
cat $OUT/r/eval_qwen/indexer_eval.md $OUT/r/pf_qwen/planted_fact.md 2>/dev/null; tail -3 $OUT/r/pf_qwen.log
for i in 0 1 2 3 4 5; do cp $W/e$i/manifest.json $OUT/r/manifest_e$i.json; done
cd $OUT && tar czf out.tgz r && rm -rf r
