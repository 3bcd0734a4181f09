"""Planted facts (CPU, budget 0.2) for several indexer checkpoints, with full attention and the zero-shot indexer.

usage: python planted_fact_checkpoints.py MODEL LENGTHS FIRST_SEED N CKPT...
"""

import sys

from flashmemory import LSAConfig, generate, load_indexer, model_fingerprint
from flashmemory.bench.planted_fact import planted_fact
from flashmemory.runtime.ask import load_on

model, tok = load_on(sys.argv[1], "cpu", progress=False)
lengths = [int(x) for x in sys.argv[2].split(",")]
s0, n = int(sys.argv[3]), int(sys.argv[4])
fp = model_fingerprint(model)
methods = {"full": ("full", None), "zero": ("lsa", None)}
for ck in sys.argv[5:]:
    methods[ck.rstrip("/").split("/")[-1]] = ("lsa", load_indexer(ck, fingerprint=fp))
score = {}
for L in lengths:
    for s in range(s0, s0 + n):
        pf = planted_fact(tok, L, seed=s)
        line = []
        for name, (m, ind) in methods.items():
            r = generate(model, tok, pf.prompt, method=m, lsa=LSAConfig(budget=0.2), indexer=ind, max_new_tokens=16)
            ok = pf.is_correct(r.text)
            score[(L, name)] = score.get((L, name), 0) + ok
            line.append(f"{name}={int(ok)}")
        print(L, s, " ".join(line), flush=True)
for k, v in score.items():
    print(k, v)
