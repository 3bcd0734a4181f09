# After run_dumps.sh, on the same machine: the shipped head and a head trained at 16-32K, on the held-out prompts.
# (As run: the first two commands side by side, then the third; W is where run_dumps.sh left the dumps.)
W=$HOME/ql; mkdir -p $OUT/r
T=$(for i in 0 1 2 3 4 5 6 7; do echo -n "-d $W/d/t$i "; done)
E=$(for i in 0 1 2 3 4 5 6 7; do echo -n "-d $W/d/e$i "; done)
CK=src/flashmemory/checkpoints/qwen2.5-coder-0.5b
flashmemory indexer-eval $E --ckpt $CK --by-length 24576 -o $OUT/r/eval_shipped > $OUT/r/eval_shipped.log 2>&1 &
flashmemory train-feedback $T -i $CK -o $OUT/r/ck_long --device cuda > $OUT/r/train_long.log 2>&1 &
wait
flashmemory indexer-eval $E --ckpt $OUT/r/ck_long --by-length 24576 -o $OUT/r/eval_long > $OUT/r/eval_long.log 2>&1
E=$(ls -d $W/d/e? | tr '\n' ',' | sed 's/,$//')
python3 feedback_ceiling.py $E $CK 0
python3 miss_kinds.py $E $CK 0
