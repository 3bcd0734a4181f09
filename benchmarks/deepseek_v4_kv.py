"""Device KV of DeepSeek-V4-Flash, full cache vs LSA, computed from shapes (and checked on a GPU with --check).

python benchmarks/deepseek_v4_kv.py --lengths 131072,262144,524288,1048576 --budget 0.1 --out benchmarks/results
python benchmarks/deepseek_v4_kv.py --check --out OUT_DIR     # on a GPU: random weights, fewer layers, real tensors

The table counts, per sequence, what stays on the accelerator: CSA attention entries and their lightning-indexer
keys (LSA: only the reserve of resident pages, sink and recent tail), the Memory Indexer's keys (LSA only), HCA
entries, raw sliding windows and the compressors' pending state (an upper bound). ``--check`` builds the
DeepSeek-V4-Flash attention shape with fewer layers (and few experts, a small vocabulary: neither changes a KV
shape), runs transformers' own cache and the LSA cache over the same prompt, and compares every component with
the bytes of the tensors actually held, and their sum with the CUDA allocator.
"""

from __future__ import annotations

import argparse
import gc
import json
import time
from pathlib import Path

import torch

from flashmemory.bench.record import command_line, git_commit, machine_description
from flashmemory.deepseek_v4.accounting import full_cache_bytes, layer_state_tensors, lsa_cache_bytes, plan_reserve
from flashmemory.deepseek_v4.cache import DeepseekV4LSACache, deepseek_v4_lsa_config
from flashmemory.deepseek_v4.configs import flash_config
from flashmemory.deepseek_v4.spec import deepseek_v4_spec
from flashmemory.memory.accounting import storage_bytes

MIB = 2**20
COMPONENTS = ("csa_entries", "csa_indexer_keys", "memory_indexer_keys", "hca_entries", "sliding_window")


def computed_rows(lengths: list[int], budget: float, max_new_tokens: int, num_targets: int) -> list[dict]:
    spec = deepseek_v4_spec(flash_config())
    lsa = deepseek_v4_lsa_config(budget=budget)
    rows = []
    for n in lengths:
        layout = plan_reserve(
            spec, lsa, num_targets=num_targets, context_tokens=n, max_new_tokens=max_new_tokens, elem=2
        )
        final = n + max_new_tokens
        full = full_cache_bytes(spec, final, elem=2)
        ours = lsa_cache_bytes(spec, layout, final, num_targets=num_targets, elem=2)
        rows.append(
            {
                "context_tokens": n,
                "final_tokens": final,
                "page_slots": layout.num_page_slots,
                "resident_tokens": layout.num_slots * spec.csa_rate,
                "full": full.to_dict(),
                "lsa": ours.to_dict(),
                "ratio": ours.total / full.total,
            }
        )
    return rows


def markdown_computed(rows: list[dict]) -> list[str]:
    head = (
        "| context | method | CSA entries | CSA indexer keys | Memory-Indexer keys | HCA entries | windows | state "
        "| total | LSA / full |"
    )
    out = [head, "|" + "---|" * 10]
    for r in rows:
        for method in ("full", "lsa"):
            b = r[method]
            cells = " | ".join(f"{b[c] / MIB:,.1f}" for c in (*COMPONENTS, "compressor_state", "total"))
            ratio = f"{r['ratio']:.3f}" if method == "lsa" else ""
            label = "full" if method == "full" else f"LSA ({r['page_slots']} pages, {r['resident_tokens']:,} tok)"
            out.append(f"| {r['context_tokens'] // 1024}K | {label} | {cells} | {ratio} |")
    return out


def measured(cache) -> dict[str, int]:
    groups: dict[str, list] = {}
    for layer in cache.layers:
        for name, tensors in layer_state_tensors(layer).items():
            groups.setdefault(name, []).extend(tensors)
    out = {name: storage_bytes(t) for name, t in groups.items()}
    if isinstance(cache, DeepseekV4LSACache):
        out["csa_entries"] = storage_bytes(cache.store.reserve_k.values())
        out["csa_indexer_keys"] = storage_bytes(cache.store.reserve_v.values())
        out["memory_indexer_keys"] = storage_bytes(cache.chunk_keys.device_tensors())
    out["total"] = sum(v for k, v in out.items())
    return out


def allocated(device: torch.device) -> int | None:
    if device.type != "cuda":
        return None
    gc.collect()
    torch.cuda.synchronize(device)
    return torch.cuda.memory_allocated(device)


@torch.no_grad()
def run_cache(model, ids: torch.Tensor, cache, steps: int) -> tuple[dict[str, int], int | None]:
    """Prefill + ``steps`` greedy decode steps; returns measured components and the CUDA allocator's growth."""
    before = allocated(ids.device)
    out = model(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
    for _ in range(steps):
        tok = out.logits[:, -1].argmax(-1, keepdim=True)
        del out
        out = model(input_ids=tok, past_key_values=cache, use_cache=True)
    del out
    after = allocated(ids.device)
    return measured(cache), None if before is None else after - before


def check(args) -> dict:
    device = torch.device(args.check_device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--check needs a CUDA device (or --check-device cpu for a slow run without the allocator)")
    config = flash_config(args.check_layers, num_experts=4)
    config.vocab_size = 1024
    with torch.device(device):
        torch.manual_seed(0)
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16, attn_implementation="eager").eval()
    spec = deepseek_v4_spec(model)
    ids = torch.randint(3, config.vocab_size, (1, args.check_tokens), device=device)
    final = args.check_tokens + args.check_steps
    from transformers.cache_utils import DynamicCache

    t0 = time.perf_counter()
    stock = DynamicCache(config=model.config)
    full_got, full_alloc = run_cache(model, ids, stock, args.check_steps)
    del stock
    lsa = deepseek_v4_lsa_config(budget=None, max_pages=args.check_pages)
    with DeepseekV4LSACache(model, lsa, max_new_tokens=args.check_steps) as cache:
        lsa_got, lsa_alloc = run_cache(model, ids, cache, args.check_steps)
        layout, targets = cache.store.layout, len(cache.targets)
        peak = cache.stats.peak_device_bytes
    full_want = full_cache_bytes(spec, final, elem=2).to_dict()
    lsa_want = lsa_cache_bytes(spec, layout, final, num_targets=targets, elem=2).to_dict()
    exact = ("csa_entries", "csa_indexer_keys", "hca_entries", "sliding_window")
    mismatches = [
        f"{side}.{c}: measured {got.get(c, 0)} computed {want[c]}"
        for side, got, want in (("full", full_got, full_want), ("lsa", lsa_got, lsa_want))
        for c in exact
        if got.get(c, 0) != want[c]
    ]
    if lsa_got["memory_indexer_keys"] > lsa_want["memory_indexer_keys"]:
        mismatches.append("lsa.memory_indexer_keys above its bound")
    for side, got, want in (("full", full_got, full_want), ("lsa", lsa_got, lsa_want)):
        if got["state"] > want["compressor_state"]:
            mismatches.append(f"{side}.state {got['state']} above its bound {want['compressor_state']}")
    return {
        "layers": args.check_layers,
        "layer_types": list(spec.layer_types),
        "context_tokens": args.check_tokens,
        "decode_steps": args.check_steps,
        "page_slots": layout.num_page_slots,
        "full": {"measured": full_got, "computed": full_want, "allocator": full_alloc},
        "lsa": {"measured": lsa_got, "computed": lsa_want, "allocator": lsa_alloc, "peak_sampled": peak},
        "mismatches": mismatches,
        "seconds": time.perf_counter() - t0,
    }


def markdown_check(c: dict) -> list[str]:
    out = [
        f"Check on random weights: {c['layers']} layers ({', '.join(t.split('_')[0] for t in c['layer_types'])}), "
        f"{c['context_tokens']} prompt tokens + {c['decode_steps']} decode steps, LSA {c['page_slots']} page slots.",
        "",
        "| method | component | measured tensors (MiB) | computed from shapes (MiB) |",
        "|---|---|---|---|",
    ]
    for side in ("full", "lsa"):
        got, want = c[side]["measured"], c[side]["computed"]
        for comp in (*COMPONENTS, "state"):
            key = "compressor_state" if comp == "state" else comp
            bound = " (bound)" if comp == "state" else ""
            out.append(f"| {side} | {comp} | {got.get(comp, 0) / MIB:.3f} | {want[key] / MIB:.3f}{bound} |")
        alloc = c[side]["allocator"]
        alloc = "not measured" if alloc is None else f"allocator growth {alloc / MIB:.3f}"
        out.append(f"| {side} | **total** ({alloc}) | {got['total'] / MIB:.3f} | {want['total'] / MIB:.3f} |")
    out += ["", "Mismatches: " + ("; ".join(c["mismatches"]) if c["mismatches"] else "none")]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lengths", default="131072,262144,524288,1048576")
    ap.add_argument("--budget", type=float, default=0.1, help="LSA device cap, fraction of the full cache")
    ap.add_argument("--max-new-tokens", type=int, default=1024)
    ap.add_argument("--targets", type=int, default=3, help="CSA layers the Memory Indexer reads")
    ap.add_argument("--check", action="store_true", help="also check against real tensors (needs CUDA)")
    ap.add_argument("--check-layers", type=int, default=5)
    ap.add_argument("--check-tokens", type=int, default=8192)
    ap.add_argument("--check-steps", type=int, default=70)
    ap.add_argument("--check-pages", type=int, default=8)
    ap.add_argument("--check-device", default="cuda")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = ap.parse_args()
    lengths = [int(x) for x in args.lengths.split(",")]
    record = {
        "command": command_line("benchmarks/deepseek_v4_kv.py", vars(args) | {"check": None, "out": None})
        + (" --check" if args.check else ""),
        "commit": git_commit(),
        "machine": machine_description(),
        "shape": "DeepSeek-V4-Flash (43 layers: 2 sliding, 21 CSA, 20 HCA; head 512, indexer head 128, bf16 KV)",
        "rows": computed_rows(lengths, args.budget, args.max_new_tokens, args.targets),
    }
    md = [
        "# DeepSeek-V4-Flash device KV per sequence: full cache vs LSA (MiB, computed from shapes)",
        "",
        f"Command: `{record['command']}`  ",
        f"Commit: {record['commit']} · machine: {record['machine']}  ",
        f"{record['shape']}; LSA budget {args.budget} of the full cache at the prompt length, "
        f"{args.targets} Memory-Indexer target layers, page 64 entries (256 tokens), sizes at prompt + "
        f"{args.max_new_tokens} generated tokens; compressor state is an upper bound.",
        "",
        *markdown_computed(record["rows"]),
    ]
    name = "deepseek_v4_kv_accounting"
    if args.check:
        record["check"] = check(args)
        md += ["", "## Checked against allocated tensors", "", *markdown_check(record["check"])]
        name = "deepseek_v4_kv_check"
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{name}.json").write_text(json.dumps(record, indent=1))
    (args.out / f"{name}.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))
    if args.check and record["check"]["mismatches"]:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
