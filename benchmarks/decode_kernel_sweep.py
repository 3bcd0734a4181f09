"""Tuning sweep of the sparse decode kernel: time per call against the bytes it must read, per launch setting.

For each head shape (Llama-3-8B: 32 query / 8 KV heads; Qwen2.5-7B: 28 / 4), context and batch it builds the
reserve that ``plan_layout`` gives at the LSA budget (every page slot filled with a distinct page, tail full) and,
with ``--full``, a reserve holding every page. It then times one layer's attention call of
``sparse_decode_fwd`` for every combination of split count, key tile, warps, pipeline stages and loop form
(branches vs masked loads), inside a CUDA graph of ``--calls`` back-to-back calls, as the captured decode step runs
it. Each setting's output is checked against the default setting's output first (a setting more than 2% off
is not timed).

Reported per setting: microseconds per call, and the KV bytes it must read divided by that time, beside the
device's measured copy rate (bytes read and written by one large ``copy_``). The best setting per case and the
default heuristic's time are printed and written to ``kernel_sweep.json`` / ``kernel_sweep.md`` under ``--out``.
"""

from __future__ import annotations

import argparse
import inspect
import itertools
import json
from pathlib import Path

import torch

# the sibling script (run from benchmarks/, so it is on the path): the same shapes, layout and resident set
from decode_speed import SHAPES, kv_geometry, lsa_plan, measure_ceilings, resident_set

from flashmemory.attention.sparse_decode_triton import _num_splits, _num_tiles, sparse_decode_fwd
from flashmemory.bench.record import provenance
from flashmemory.config import LSAConfig
from flashmemory.models.adapter import DEFAULT_PAGE_CHUNKS

# the launch settings sparse_decode_fwd uses when not told otherwise: the "default" row of each case
LAUNCH_KNOBS = ("num_warps", "num_stages", "branchless")
LAUNCH_DEFAULTS = {n: inspect.signature(sparse_decode_fwd).parameters[n].default for n in LAUNCH_KNOBS}


def reserve(name: str, context: int, batch: int, lsa: LSAConfig, full: bool, device):
    """Random q and reserve of one layer of shape ``name`` (``decode_speed.py``'s shapes, layout and resident set),
    and the KV bytes one call must read."""
    cfg = SHAPES[name](0)
    _, hkv, d = kv_geometry(cfg)
    pages = None if full else lsa_plan(cfg, lsa, context, 256, 1)[0].num_page_slots
    rs, slots, resident = resident_set(lsa, batch, context, pages, 264, device)
    q = torch.randn(batch, cfg.num_attention_heads, d, device=device, dtype=torch.bfloat16)
    k = torch.randn(batch, hkv, slots, d, device=device, dtype=torch.bfloat16)
    v = torch.randn_like(k)
    return q, k, v, rs, resident * batch * hkv * d * 2 * 2


def time_call(fn, calls: int, reps: int = 15) -> float:
    """Median microseconds per call, ``calls`` calls captured in one CUDA graph."""
    fn()
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(calls):
            fn()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        g.replay()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) * 1e3 / calls)
    times.sort()
    return times[len(times) // 2]


def sweep_case(q, k, v, rs, kv_bytes: float, args, device) -> tuple[list[dict], dict, dict]:
    """Every launch setting of one case: its rows, the best row and the default heuristic's row."""
    batch, hkv, d = k.shape[0], k.shape[1], k.shape[3]
    scale = d**-0.5
    ref = sparse_decode_fwd(q, k, v, rs, scale)
    auto = _num_splits(batch * hkv, _num_tiles(rs, k.shape[2], 64), device)  # the splits of the default tile
    rows = []
    for sp, bn, w, st, bl in itertools.product(
        args.splits.split(","),
        [int(x) for x in args.block_n.split(",")],
        [int(x) for x in args.warps.split(",")],
        [int(x) for x in args.stages.split(",")],
        [False, True],
    ):
        splits = auto if sp == "auto" else int(sp)
        if sp != "auto" and splits == auto:
            continue

        def call(splits=splits, bn=bn, w=w, st=st, bl=bl):
            return sparse_decode_fwd(
                q, k, v, rs, scale, num_splits=splits, block_n=bn, num_warps=w, num_stages=st, branchless=bl
            )

        try:
            out = call()
            err = float((out.float() - ref.float()).norm() / ref.float().norm())
            us = time_call(call, args.calls) if err < 2e-2 else float("nan")
        except Exception as exc:  # a setting the compiler rejects (registers, shared memory) is a result
            print(f"  splits={splits} bn={bn} w={w} st={st} branchless={bl}: {type(exc).__name__}")
            continue
        rows.append(
            dict(
                splits=splits,
                auto=sp == "auto",
                block_n=bn,
                warps=w,
                stages=st,
                branchless=bl,
                err=err,
                us=us,
                gb_s=kv_bytes / (us * 1e-6) / 1e9,
            )
        )
    ok = [r for r in rows if r["us"] == r["us"]]
    best = min(ok, key=lambda r: r["us"])
    default = next(
        r
        for r in rows
        if r["auto"]
        and r["block_n"] == 64
        and (r["warps"], r["stages"], r["branchless"]) == tuple(LAUNCH_DEFAULTS[n] for n in LAUNCH_KNOBS)
    )
    return rows, best, default


def write(cases: list[dict], args, rate: float, device) -> None:
    """JSON and markdown of the cases so far (rewritten after every case, so a cut-off run keeps them)."""
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    prov = provenance("benchmarks/decode_kernel_sweep.py", vars(args))
    (out / "kernel_sweep.json").write_text(
        json.dumps(dict(**prov, device=torch.cuda.get_device_name(device), copy_tb_s=rate, cases=cases), indent=1)
    )
    lines = [
        "# Sparse decode kernel sweep",
        "",
        f"Command: `{prov['command']}`; commit `{prov['commit']}`; {torch.cuda.get_device_name(device)}, "
        f"torch {torch.__version__}. Device copy rate {rate:.2f} TB/s (read+write).",
        "",
        "| model | ctx | batch | reserve | KV MB | default µs | default GB/s | best µs | best GB/s | splits | "
        "block_n | warps | stages | branchless |",
        "|---|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for c in cases:
        d, b = c["default"], c["best"]
        lines.append(
            f"| {c['model']} | {c['context']} | {c['batch']} | {c['reserve']} | {c['kv_mb']:.0f} | {d['us']:.1f} | "
            f"{d['gb_s']:.0f} | {b['us']:.1f} | {b['gb_s']:.0f} | {b['splits']} | {b['block_n']} | {b['warps']} | "
            f"{b['stages']} | {b['branchless']} |"
        )
    (out / "kernel_sweep.md").write_text("\n".join(lines) + "\n")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--models", default="llama3-8b,qwen2.5-7b")
    p.add_argument("--contexts", default="32768,131072,524288")
    p.add_argument("--batches", default="1,8")
    p.add_argument("--budget", type=float, default=0.15)
    p.add_argument("--full", action="store_true", help="also sweep a reserve that holds every page")
    p.add_argument("--splits", default="auto,16,32,64,128,256")
    p.add_argument("--block-n", default="32,64")
    p.add_argument("--warps", default="4,8")
    p.add_argument("--stages", default="1,2,3")
    p.add_argument("--calls", type=int, default=32)
    args = p.parse_args()
    device = torch.device("cuda")
    lsa = LSAConfig(budget=args.budget, page_chunks=DEFAULT_PAGE_CHUNKS)  # the page size of the recorded sweeps
    rate, _ = measure_ceilings(device)
    print(f"device copy rate {rate:.2f} TB/s (read+write)")
    cases = []
    for name, context, batch, full in itertools.product(
        args.models.split(","),
        [int(c) for c in args.contexts.split(",")],
        [int(b) for b in args.batches.split(",")],
        [False, True] if args.full else [False],
    ):
        try:
            q, k, v, rs, kv_bytes = reserve(name, context, batch, lsa, full, device)
        except torch.OutOfMemoryError:
            print(f"{name} {context} b={batch} full={full}: does not fit, skipped")
            continue
        case = dict(model=name, context=context, batch=batch, reserve="full" if full else "lsa", kv_mb=kv_bytes / 1e6)
        rows, best, default = sweep_case(q, k, v, rs, kv_bytes, args, device)
        case.update(best=best, default=default, rows=rows)
        cases.append(case)
        print(
            f"{name} ctx={context} b={batch} {case['reserve']}: {kv_bytes / 1e6:.0f} MB, default {default['us']:.1f} us"
            f" ({default['gb_s']:.0f} GB/s, {default['splits']} splits); best {best['us']:.1f} us"
            f" ({best['gb_s']:.0f} GB/s) splits={best['splits']} bn={best['block_n']} w={best['warps']}"
            f" st={best['stages']} branchless={best['branchless']}"
        )
        write(cases, args, rate, device)
        del q, k, v, rs
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
