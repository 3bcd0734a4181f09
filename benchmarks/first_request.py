"""What the first LSA request at a new length pays for its host mirror, and how much host memory it locks.

A random-weight model with a real shape (time does not depend on weight values) answers one prompt of each length
in ``--contexts`` several times, the methods in the order ``--order`` gives (default: full, lsa, full, lsa), after
one short warm-up request per method. Recorded per request: wall seconds, the prefill's and the decode's seconds,
the device KV share, the peak device memory, the drop in the machine's ``MemAvailable`` since the warm-up (host
memory taken, page-locked or not), and the page-locked bytes as torch's caching host allocator and the mirror's
pool count them.

Run once per code version with the same arguments to compare them side by side on one machine.

    python benchmarks/first_request.py --shape llama3-8b --contexts 131072 --out OUT
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

import torch
from decode_speed import SHAPES
from session_speed import ByteTokenizer, text_of
from transformers import AutoModelForCausalLM

from flashmemory import LSAConfig, generate
from flashmemory.bench.record import provenance
from flashmemory.runtime.session import build_prompt

GiB = 1 << 30


def meminfo_available() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no MemAvailable in /proc/meminfo")


def one(model, tok, prompt: str, method: str, lsa: LSAConfig, max_new: int) -> dict:
    kw = dict(method=method, lsa=lsa if method == "lsa" else None, chat=False, cuda_graph=False)
    if method == "lsa":
        kw["indexer"] = "zero-shot"
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    out = generate(model, tok, prompt, max_new_tokens=max_new, **kw)
    torch.cuda.synchronize()
    wall = time.perf_counter() - t0
    return {
        "method": method,
        "seconds": wall,
        "prefill_seconds": out.stats.prefill_seconds,
        "decode_seconds": out.stats.decode_seconds,
        "kv_ratio": out.stats.kv_ratio,
        "peak_device_gib": torch.cuda.max_memory_allocated() / GiB,
        "tokens": out.token_ids,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="llama3-8b", choices=sorted(SHAPES))
    ap.add_argument("--contexts", default="131072")
    ap.add_argument("--order", default="full,lsa,full,lsa")
    ap.add_argument("--budget", type=float, default=0.15)
    ap.add_argument("--max-new-tokens", type=int, default=16)
    ap.add_argument("--label", default="", help="a name for the code version, stored with the results")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    cfg = SHAPES[args.shape](None)
    torch.manual_seed(0)  # the same weights in every run, so that two code versions' answers can be compared
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16, attn_implementation="sdpa").eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02)
    tok, lsa = ByteTokenizer(), LSAConfig(budget=args.budget)
    order = args.order.split(",")
    for method in dict.fromkeys(order):
        one(model, tok, build_prompt(text_of(4096, random.Random(1)), "which?"), method, lsa, 4)
    base = meminfo_available()
    head = provenance("benchmarks/first_request.py", vars(args) | {"out": str(args.out)})
    report = {"label": args.label, "shape": args.shape, "budget": args.budget, **head, "rows": []}
    path = args.out / f"first_request{'_' + args.label if args.label else ''}.json"
    for context in (int(c) for c in args.contexts.split(",")):
        prompt = build_prompt(text_of(context, random.Random(context)), "which?")
        for i, method in enumerate(order):
            row = one(model, tok, prompt, method, lsa, args.max_new_tokens)
            row |= {"context": context, "request": i, "available_drop_gib": (base - meminfo_available()) / GiB}
            row |= allocator_bytes()
            report["rows"].append(row)
            path.write_text(json.dumps(report, indent=1))  # after every request: a later failure keeps these
            print(json.dumps({k: v for k, v in row.items() if k != "tokens"}), flush=True)


def allocator_bytes() -> dict:
    """Page-locked bytes as each allocator counts them: torch's caching host allocator, and the mirror's pool."""
    stats = torch.cuda.host_memory_stats()
    out = {f"torch_host_{k.replace('.', '_')}": v for k, v in stats.items() if k.endswith("bytes.current")}
    try:
        from flashmemory.memory.pinned import HOST_POOL
    except ImportError:  # code from before the pool
        return out
    return out | {"pool_locked_bytes": HOST_POOL.locked_bytes, "pool_free_bytes": HOST_POOL.free_bytes}


if __name__ == "__main__":
    main()
