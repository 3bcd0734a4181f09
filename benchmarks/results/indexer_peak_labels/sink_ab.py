"""Planted facts with the zero-shot indexer and a 16- or 64-token sink (CPU, budget 0.2).

usage: python sink_ab.py MODEL LENGTH FIRST_SEED END_SEED
"""

import sys
import time

from flashmemory import LSAConfig, generate
from flashmemory.bench.planted_fact import planted_fact
from flashmemory.runtime.ask import load_on

model, tok = load_on(sys.argv[1], "cpu", progress=False)
L = int(sys.argv[2])
seeds = range(int(sys.argv[3]), int(sys.argv[4]))
variants = {"sink16": LSAConfig(budget=0.2), "sink64": LSAConfig(budget=0.2, sink=64)}
score = {k: 0 for k in variants}
for s in seeds:
    pf = planted_fact(tok, L, seed=s)
    out = []
    for name, cfg in variants.items():
        t0 = time.time()
        r = generate(model, tok, pf.prompt, method="lsa", lsa=cfg, max_new_tokens=16)
        ok = pf.is_correct(r.text)
        score[name] += ok
        out.append(f"{name}={ok} {r.text.strip()[:40]!r} kv={r.stats.kv_ratio:.3f} {time.time() - t0:.0f}s")
    print(s, " | ".join(out), flush=True)
print(score)
