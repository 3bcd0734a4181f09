"""Planted facts (CPU, budget 0.2) with follow_chunks 0 and 1.

usage: python follow_chunks_ab.py MODEL LENGTH FIRST_SEED N [CKPT]
"""

import sys

from flashmemory import LSAConfig, generate, load_indexer, model_fingerprint
from flashmemory.bench.planted_fact import planted_fact
from flashmemory.runtime.ask import load_on

model, tok = load_on(sys.argv[1], "cpu", progress=False)
L = int(sys.argv[2])
s0, n = int(sys.argv[3]), int(sys.argv[4])
ind = load_indexer(sys.argv[5], fingerprint=model_fingerprint(model)) if len(sys.argv) > 5 else None
score = {}
for s in range(s0, s0 + n):
    pf = planted_fact(tok, L, seed=s)
    line = []
    for f in (0, 1):
        r = generate(
            model,
            tok,
            pf.prompt,
            method="lsa",
            lsa=LSAConfig(budget=0.2, follow_chunks=f),
            indexer=ind,
            max_new_tokens=16,
        )
        ok = pf.is_correct(r.text)
        score[f] = score.get(f, 0) + ok
        line.append(f"follow{f}={int(ok)} kv={r.stats.kv_ratio:.3f}")
    print(L, s, " ".join(line), flush=True)
print(score)
