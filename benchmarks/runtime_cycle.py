"""Whole LSA decode cycles through the runtime: pages recalled at the boundary against pages prefetched before it.

The runtime itself (``FastLSACache`` with its async store, steps replayed by ``GraphDecodeStep`` on CUDA) decodes a
random-weight model of a real shape after a real prefill. A page chooser that moves a fixed share of the page slots
at every boundary stands in for the indexer, so each setting copies the same pages per cycle:

- ``no copy``: the same pages every cycle, so the cycle is the steps' own time (tail flush included);
- ``prefetch 0``: the boundary chooses and copies; the step after it waits, layer by layer, for each layer's pages;
- ``prefetch N``: the pages are chosen and copied N steps before the boundary into spare slots.

Speed does not depend on weight values, so random weights with the real shape are used. A model with fewer layers
than the real one (``--layers``) keeps the prefill and the host mirror small; the copy and the steps both scale
with the layer count, so their ratio does not depend on it.

Usage: ``python3 benchmarks/runtime_cycle.py --out DIR`` (CUDA; ``--device cpu --model tiny`` for a smoke run).
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch
from decode_speed import SHAPES, sync
from transformers import AutoModelForCausalLM

from flashmemory.attention.fast_path import FastLSACache
from flashmemory.config import LSAConfig
from flashmemory.memory.accounting import storage_bytes
from flashmemory.runtime.graph_step import GraphDecodeStep


def rotating_pages(churn: float):
    """A page chooser whose window of pages moves by ``churn`` of the page slots at every call."""
    calls = [0]

    def choose(cache) -> torch.Tensor:
        store = cache.store
        n, k = store.selectable_pages(), store.layout.num_page_slots
        shift = round(churn * k)
        pages = (calls[0] * shift + torch.arange(k, device=store.device)) % max(n, 1)
        calls[0] += 1
        return torch.where(torch.arange(k, device=store.device) < n, pages, -1).expand(store.batch, -1)

    return choose


def run_setting(model, args, batch: int, churn: float, prefetch: int) -> dict:
    """Prefill ``batch`` random prompts, decode ``args.cycles + 1`` cycles and time the last ``args.cycles``."""
    dev = next(model.parameters()).device
    lsa = LSAConfig(budget=args.budget, prefetch_steps=prefetch, attention_backend="torch")
    interval = lsa.interval
    steps = interval * (args.cycles + 1)
    backend = "triton" if dev.type == "cuda" else "torch"
    ids = torch.randint(0, model.config.vocab_size, (batch, args.context), device=dev)
    with (
        torch.no_grad(),
        FastLSACache(
            model, lsa, max_new_tokens=steps + 1, forced_pages=rotating_pages(churn), backend=backend
        ) as cache,
    ):
        model(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
        step = GraphDecodeStep(model, cache) if dev.type == "cuda" else None
        tok = torch.randint(0, model.config.vocab_size, (batch, 1), device=dev)
        pos = torch.full((batch, 1), args.context, device=dev)
        cycle_ms: list[float] = []
        start = None
        for i in range(steps):
            if i % interval == 0 and i >= interval:  # this step starts a cycle (a boundary)
                if start is not None:
                    cycle_ms.append(_elapsed_ms(start, dev))
                start = _mark(dev)
            if step is not None:
                step(tok, pos)
            else:
                model(input_ids=tok, position_ids=pos, past_key_values=cache, use_cache=True)
            pos = pos + 1
        cycle_ms.append(_elapsed_ms(start, dev))
        cache.sync_stats()
        pages = cache.stats.pages_recalled
        layout = cache.store.layout
        spare = cache.spare_slots
        kv_bytes = cache.device_kv_bytes()
        reserve_bytes = storage_bytes(cache.store.device_tensors())
    cycle_ms.sort()
    return {
        "batch": batch,
        "churn": churn,
        "prefetch_steps": prefetch,
        "cycle_ms": cycle_ms[len(cycle_ms) // 2],
        "cycle_ms_all": cycle_ms,
        "page_slots": layout.num_page_slots,
        "spare_slots": spare,
        "pages_copied_per_cycle": pages[-1] if pages else 0,
        "device_kv_bytes": kv_bytes,
        "reserve_bytes": reserve_bytes,
    }


def _mark(dev: torch.device):
    if dev.type == "cuda":
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event
    return time.perf_counter()


def _elapsed_ms(start, dev: torch.device) -> float:
    if dev.type == "cuda":
        end = torch.cuda.Event(enable_timing=True)
        end.record()
        end.synchronize()
        return start.elapsed_time(end)
    return 1e3 * (time.perf_counter() - start)


def markdown(report: dict) -> str:
    a = report["args"]
    lines = [
        f"# LSA decode cycles through the runtime ({report['device']}, torch {report['torch']})",
        "",
        f"{a['model']} shape with {a['layers']} layers, context {a['context']}, budget {a['budget']}, "
        f"{a['churn']:.0%} of page slots moving per boundary, median of {a['cycles']} cycles of 64 steps.",
        "",
        "| batch | setting | page slots (spare) | pages copied / cycle | cycle ms | over no copy |",
        "|---|---|---|---:|---:|---:|",
    ]
    for batch in a["batches"]:
        rows = [r for r in report["rows"] if r["batch"] == batch]
        base = next(r for r in rows if r["churn"] == 0.0)
        for r in rows:
            name = "no copy" if r["churn"] == 0.0 else f"prefetch {r['prefetch_steps']}"
            lines.append(
                f"| {batch} | {name} | {r['page_slots']} ({r['spare_slots']}) | {r['pages_copied_per_cycle']} "
                f"| {r['cycle_ms']:.1f} | {r['cycle_ms'] / base['cycle_ms'] - 1:+.1%} |"
            )
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--model", default="llama3-8b", choices=sorted(SHAPES))
    p.add_argument("--layers", type=int, default=8, help="decoder layers (0: the real depth)")
    p.add_argument("--context", type=int, default=32768)
    p.add_argument("--batches", default="1,8,24")
    p.add_argument("--budget", type=float, default=0.15)
    p.add_argument("--churn", type=float, default=0.25, help="share of page slots that move per boundary")
    p.add_argument("--prefetch", default="16", help="comma-separated prefetch_steps to compare with 0")
    p.add_argument("--cycles", type=int, default=3, help="timed cycles per setting (after one warm-up cycle)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="bfloat16")
    args = p.parse_args()
    device = torch.device(args.device)
    batches = [int(x) for x in args.batches.split(",")]
    prefetches = [int(x) for x in args.prefetch.split(",")]
    torch.manual_seed(0)
    cfg = SHAPES[args.model](args.layers)
    model = AutoModelForCausalLM.from_config(cfg, dtype=getattr(torch, args.dtype), attn_implementation="sdpa")
    model = model.to(device).eval()
    report = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__,
        "args": {**vars(args), "out": str(args.out), "batches": batches, "layers": cfg.num_hidden_layers},
        "rows": [],
    }
    args.out.mkdir(parents=True, exist_ok=True)
    for batch in batches:
        for churn, prefetch in [(0.0, 0), (args.churn, 0), *[(args.churn, n) for n in prefetches]]:
            row = run_setting(model, args, batch, churn, prefetch)
            report["rows"].append(row)
            print(json.dumps(row), flush=True)
            (args.out / "runtime_cycle.json").write_text(json.dumps(report, indent=1))
            sync(device)
            if device.type == "cuda":
                # the next prefill needs one block as large as this one's activations, not scattered free room
                torch.cuda.empty_cache()
    (args.out / "runtime_cycle.md").write_text(markdown(report))
    print(markdown(report))


if __name__ == "__main__":
    main()
