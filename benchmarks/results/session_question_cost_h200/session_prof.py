"""Where an LSA question of a Session spends its time (random-weight Llama-3-8B shape, H200).

python session_prof.py CONTEXTS [METHODS]     # METHODS: lsa,full (default); lsa-graph replays decode steps
"""

import collections
import json
import os
import random
import sys
import time

sys.path.insert(0, "benchmarks")
import torch
from session_speed import ByteTokenizer, random_weight_model, text_of

from flashmemory import LSAConfig, Session
from flashmemory.attention.cache import LSACache
from flashmemory.attention.prefix import PrefixKV
from flashmemory.indexer.chunk_keys import ChunkKeys
from flashmemory.memory.pinned import PinnedPool
from flashmemory.memory.store import KVStore

OUT = os.environ.get("OUT", ".")
acc = collections.defaultdict(float)
cnt = collections.Counter()


def wrap(cls, name, label):
    f = getattr(cls, name)

    def g(*a, **k):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        r = f(*a, **k)
        torch.cuda.synchronize()
        acc[label] += time.perf_counter() - t0
        cnt[label] += 1
        return r

    setattr(cls, name, g)


wrap(PrefixKV, "layer", "prefix H2D")
wrap(KVStore, "write_prefill", "store.write_prefill (D2H)")
wrap(ChunkKeys, "extend", "chunk_keys.extend")
wrap(LSACache, "_boundary", "boundary")
wrap(LSACache, "_allocate", "store allocate (lease)")
wrap(PinnedPool, "lease", "pool.lease")

model = random_weight_model("llama3-8b")  # the same model as before the helper existed
tok, rng = ByteTokenizer(), random.Random(0)
lsa = LSAConfig(budget=0.15)
rows = []
for ctx in [int(c) for c in sys.argv[1].split(",")]:
    text = text_of(ctx, rng)
    # "lsa-graph": LSA with each answer's decode steps replayed from a CUDA graph
    for name in sys.argv[2].split(",") if len(sys.argv) > 2 else ("lsa", "full"):
        method = "lsa" if name.startswith("lsa") else "full"
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        s = Session(
            model,
            tok,
            text,
            method=method,
            lsa=lsa if method == "lsa" else None,
            indexer="zero-shot" if method == "lsa" else None,
            chat=False,
            cuda_graph=name.endswith("graph"),
        )
        torch.cuda.synchronize()
        t_ctx = time.perf_counter() - t0
        for q in range(4):
            acc.clear()
            cnt.clear()
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            a = s.ask(f"Which word follows the {q + 1}-th 'river'?", max_new_tokens=16)
            torch.cuda.synchronize()
            dt = time.perf_counter() - t0
            row = dict(
                context=ctx,
                method=name,
                question=q,
                seconds=dt,
                context_seconds=t_ctx,
                prefill=a.stats.prefill_seconds,
                decode=a.stats.decode_seconds,
                parts={k: round(v, 4) for k, v in acc.items()},
                calls=dict(cnt),
            )
            print(json.dumps(row), flush=True)
            rows.append(row)
            open(f"{OUT}/session_prof.json", "w").write(json.dumps(rows, indent=1))
        del s
