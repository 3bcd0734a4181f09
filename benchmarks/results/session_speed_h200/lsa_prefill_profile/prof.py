import cProfile
import io
import pstats
import random
import sys
import time

sys.path.insert(0, "benchmarks")
import torch
from session_speed import SHAPES, ByteTokenizer, text_of
from transformers import AutoModelForCausalLM

from flashmemory import LSAConfig, generate
from flashmemory.runtime.session import build_prompt

ctx = int(sys.argv[1])
cfg = SHAPES["llama3-8b"](None)
with torch.device("cuda"):
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16, attn_implementation="sdpa").eval()
with torch.no_grad():
    for p in model.parameters():
        p.normal_(0, 0.02)
tok, rng = ByteTokenizer(), random.Random(0)
lsa = LSAConfig(budget=0.15)


def one(method, n):
    kw = dict(
        method=method,
        lsa=lsa if method == "lsa" else None,
        indexer="zero-shot" if method == "lsa" else None,
        chat=False,
    )
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    out = generate(model, tok, build_prompt(text_of(n, rng), "which?"), max_new_tokens=16, **kw)
    torch.cuda.synchronize()
    return time.perf_counter() - t0, out.stats


for m in ("lsa", "full"):
    one(m, 4096)
for m in ("full", "lsa", "full", "lsa"):
    dt, st = one(m, ctx)
    print(m, f"{dt:.2f}s prefill {st.prefill_seconds:.2f} decode {st.decode_seconds:.2f}", flush=True)
pr = cProfile.Profile()
pr.enable()
one("lsa", ctx)
pr.disable()
s = io.StringIO()
pstats.Stats(pr, stream=s).sort_stats("cumulative").print_stats(45)
print(s.getvalue()[:9000])
s = io.StringIO()
pstats.Stats(pr, stream=s).sort_stats("tottime").print_stats(20)
print(s.getvalue()[:5000])
