"""Held-out planted-fact questions: full attention vs LSA (zero-shot and trained indexers) at one budget.

    python benchmarks/planted_fact_eval.py --model smollm2-135m --lengths 2048,4096 --samples 10 --budget 0.2 \
        --ckpt src/flashmemory/checkpoints/smollm2-135m --out benchmarks/results/planted_fact_smollm2

``--ckpt`` may be given several times: each checkpoint becomes a method ``lsa-<folder name>`` on the same facts.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from flashmemory import LSAConfig, generate, load_indexer, model_fingerprint
from flashmemory.bench.planted_fact import planted_fact
from flashmemory.bench.record import provenance
from flashmemory.runtime.ask import load_on


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--lengths", default="2048,4096")
    ap.add_argument("--budget", type=float, default=0.2)
    ap.add_argument("--samples", type=int, default=10)
    ap.add_argument("--seed", type=int, default=200, help="first seed; tests use 0-11, kv_memory 100+")
    ap.add_argument(
        "--ckpt", type=Path, action="append", default=[], help="trained indexer (adds lsa-<folder>); repeatable"
    )
    ap.add_argument("--max-new-tokens", type=int, default=16)
    ap.add_argument("--lsa", action="append", default=[], metavar="KEY=VALUE", help="other LSAConfig setting")
    ap.add_argument("--no-zeroshot", action="store_true", help="leave out the zero-shot indexer")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    model, tok = load_on(args.model, "auto", progress=False)
    device = model.device
    methods = {"full": ("full", None)} | ({} if args.no_zeroshot else {"lsa-zeroshot": ("lsa", None)})
    for ckpt in args.ckpt:
        name = f"lsa-{ckpt.resolve().name}"
        if name in methods:
            raise SystemExit(f"two checkpoints named {ckpt.resolve().name}: give them folders of different names")
        methods[name] = ("lsa", load_indexer(ckpt, fingerprint=model_fingerprint(model), device=device))
    lsa = LSAConfig(budget=args.budget, **parse_settings(args.lsa))
    rows = []
    for length in (int(x) for x in args.lengths.split(",")):
        for s in range(args.samples):
            task = planted_fact(tok, length, seed=args.seed + s)
            for name, (method, indexer) in methods.items():
                t0 = time.perf_counter()
                res = generate(
                    model, tok, task.prompt, method=method, lsa=lsa, indexer=indexer, max_new_tokens=args.max_new_tokens
                )
                rows.append(
                    {
                        **res.stats.to_dict(),
                        "length": length,
                        "seed": args.seed + s,
                        "method": name,
                        "correct": task.is_correct(res.text),
                        "answer": res.text.strip()[:80],
                        "wall_seconds": time.perf_counter() - t0,
                    }
                )
                print(json.dumps({k: rows[-1][k] for k in ("length", "seed", "method", "correct", "kv_ratio")}))
    meta = {
        **provenance("benchmarks/planted_fact_eval.py", vars(args)),
        "model": args.model,
        "budget": args.budget,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "planted_fact.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    table = markdown(meta, rows)
    (args.out / "planted_fact.md").write_text(table)
    print(table)


def parse_settings(items: list[str]) -> dict:
    """``["tower_slots=0.75"]`` -> ``{"tower_slots": 0.75}`` (numbers as numbers)."""
    out = {}
    for item in items:
        key, _, value = item.partition("=")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def markdown(meta: dict, rows: list[dict]) -> str:
    seeds = [r["seed"] for r in rows]
    span = f"seeds {min(seeds)}–{max(seeds)}" if seeds else "no seeds"
    lines = [
        f"# Planted facts ({span}): {meta['model']}, LSA budget {meta['budget']}",
        "",
        f"Machine: {meta['machine']} · commit `{meta['commit']}`",
        "",
        f"Command: `{meta['command']}`",
        "",
        "| context | method | correct | mean device KV ratio | mean pages recalled / boundary |",
        "|---|---|---|---|---|",
    ]
    groups: dict[tuple[int, str], list[dict]] = {}
    for r in rows:
        groups.setdefault((r["length"], r["method"]), []).append(r)
    for (length, method), rs in sorted(groups.items()):
        ratio = sum(r["kv_ratio"] for r in rs) / len(rs)
        recalls = [p for r in rs for p in r["pages_recalled"]]
        per = f"{sum(recalls) / len(recalls):.1f}" if recalls else "–"
        lines.append(f"| {length} | {method} | {sum(r['correct'] for r in rs)}/{len(rs)} | {ratio:.3f} | {per} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
