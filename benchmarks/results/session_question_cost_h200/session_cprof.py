"""cProfile of one Session question at a long context, LSA and full (random-weight Llama-3-8B shape)."""

import cProfile
import io
import os
import pstats
import random
import sys
import time

sys.path.insert(0, "benchmarks")
import torch
from session_speed import ByteTokenizer, random_weight_model, text_of

from flashmemory import LSAConfig, Session

OUT = os.environ.get("OUT", ".")
ctx = int(sys.argv[1])
model = random_weight_model("llama3-8b")  # the same model as before the helper existed
tok, rng = ByteTokenizer(), random.Random(0)
text = text_of(ctx, rng)
for method in ("lsa", "full"):
    s = Session(
        model,
        tok,
        text,
        method=method,
        lsa=LSAConfig(budget=0.15) if method == "lsa" else None,
        indexer="zero-shot" if method == "lsa" else None,
        chat=False,
    )
    for q in range(2):
        s.ask(f"Which word follows the {q + 1}-th 'river'?", max_new_tokens=16)
    torch.cuda.synchronize()
    pr = cProfile.Profile()
    pr.enable()
    t0 = time.perf_counter()
    a = s.ask("Which word follows the 9-th 'lamp'?", max_new_tokens=16)
    torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    pr.disable()
    buf = io.StringIO()
    print(
        f"== {method} {ctx}: {dt:.3f}s prefill {a.stats.prefill_seconds:.3f} decode {a.stats.decode_seconds:.3f}",
        file=buf,
    )
    st = pstats.Stats(pr, stream=buf)
    st.sort_stats("cumulative").print_stats(70)
    st.sort_stats("tottime").print_stats(30)
    open(f"{OUT}/cprof_{method}_{ctx}.txt", "w").write(buf.getvalue())
    print(buf.getvalue()[:200], flush=True)
    del s
