# The GPU part (one NVIDIA H200): prompts, dumps, then one head per input version on the same dumps, each scored on
# the held-out dumps. W: a work folder; the code of commit bae7626 (version 2 inputs) on PYTHONPATH.
W=${W:-$HOME/hd}; mkdir -p $W/p
R=benchmarks/results/indexer_feedback_h200
python $R/make_prompts.py smollm2-135m $W/smol_train.jsonl.gz "n=240,val=0,min=2048,max=7900,seed=95,kinds=all+copy_back" &
python $R/make_prompts.py smollm2-135m $W/smol_val.jsonl.gz "n=1,val=32,min=2048,max=7900,seed=73,kinds=all+copy_back" &
wait
python $R/split_prompts.py $W/smol_train.jsonl.gz $W/p 12 && python $R/split_prompts.py $W/smol_val.jsonl.gz $W/p 4
for part in $(seq 0 11 | sed 's/^/train/') eval0 eval1 eval2 eval3; do  # 16 processes on the one GPU
  out=$W/${part/train/t}; out=${out/eval/e}
  python -m flashmemory dump --model smollm2-135m --data $W/p/$part.jsonl --out $out --max-new-tokens 128 \
    --shard-size 4 --target-layers 13,14,15,16,17,18,19,20,21 --device cuda > $out.log 2>&1 &
done
wait
T=""; for i in 0 1 2 3 4 5; do T="$T -d $W/t$i"; done   # half the training parts: 108 training prompts, 12 dev
E="-d $W/e0 -d $W/e1 -d $W/e2 -d $W/e3"                  # the 32 held-out prompts
for v in 1 2; do
  python -m flashmemory train-feedback $T -i src/flashmemory/checkpoints/smollm2-135m -o $W/head_v$v \
    --tower-slots 0 --version $v --device cuda
  python -m flashmemory indexer-eval $E --ckpt $W/head_v$v --by-length 4096 -o $W/eval_v$v
done
python -m flashmemory indexer-eval $E --ckpt src/flashmemory/checkpoints/smollm2-135m --by-length 4096 -o $W/eval_shipped
