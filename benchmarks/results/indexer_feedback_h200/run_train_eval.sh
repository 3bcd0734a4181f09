# second call (same warm machine): train the heads, evaluate on the held-out prompts
set -o pipefail
source .gpu/env.sh  # as in run_dumps.sh
W=$HOME/fb; T0=$(date +%s); mkdir -p $OUT/r
TS=$(for i in 0 1 2 3 4 5; do echo -n "-d $W/smol/t$i "; done); ES="-d $W/smol/e0 -d $W/smol/e1"
TQ=$(for i in 0 1 2 3 4 5; do echo -n "-d $W/qwen/t$i "; done); EQ=$(for i in 0 1 2 3 4 5; do echo -n "-d $W/qwen/e$i "; done)
timeout 280 flashmemory train-feedback $TS -i src/flashmemory/checkpoints/smollm2-135m -o $OUT/r/ck_smol --device cuda > $OUT/r/train_smol.log 2>&1 &
P1=$!
timeout 280 flashmemory train-feedback $TQ -i src/flashmemory/checkpoints/qwen2.5-coder-0.5b -o $OUT/r/ck_qwen --device cuda > $OUT/r/train_qwen.log 2>&1 &
P2=$!
wait $P1 $P2
echo "train $(( $(date +%s)-T0 )) s"; tail -n 2 $OUT/r/train_smol.log $OUT/r/train_qwen.log
timeout 250 flashmemory indexer-eval $ES --ckpt $OUT/r/ck_smol -o $OUT/r/eval_smol > $OUT/r/eval_smol.log 2>&1 &
timeout 250 flashmemory indexer-eval $ES --ckpt $OUT/r/ck_smol --steps boundary -o $OUT/r/eval_smol_boundary > $OUT/r/eval_smol_b.log 2>&1 &
timeout 250 flashmemory indexer-eval $EQ --ckpt $OUT/r/ck_qwen -o $OUT/r/eval_qwen > $OUT/r/eval_qwen.log 2>&1 &
timeout 250 flashmemory indexer-eval $EQ --ckpt $OUT/r/ck_qwen --steps boundary -o $OUT/r/eval_qwen_boundary > $OUT/r/eval_qwen_b.log 2>&1 &
wait
cat $OUT/r/eval_smol/indexer_eval.md $OUT/r/eval_qwen/indexer_eval.md
for m in smol qwen; do for d in $W/$m/*/; do cp $d/manifest.json $OUT/r/manifest_${m}_$(basename $d).json; done; done
cd $OUT && tar czf out.tgz r && rm -rf r
echo "all $(( $(date +%s)-T0 )) s"
