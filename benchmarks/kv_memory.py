"""Peak device KV bytes of full attention vs LSA on planted-fact prompts, side by side in one process.

python benchmarks/kv_memory.py --model qwen2.5-coder-0.5b --lengths 8192,16384,32768 --out results/
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from flashmemory import LSAConfig, generate
from flashmemory.bench.planted_fact import planted_fact
from flashmemory.bench.record import provenance
from flashmemory.models.adapter import backbone_spec
from flashmemory.runtime.ask import load_on


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="qwen2.5-coder-0.5b")
    ap.add_argument("--lengths", default="8192,16384,32768")
    ap.add_argument("--budget", type=float, default=0.15)
    ap.add_argument("--samples", type=int, default=3)
    ap.add_argument("--max-new-tokens", type=int, default=24)
    ap.add_argument("--seed", type=int, default=100, help="first planted-fact seed (tests use 0-11)")
    ap.add_argument("--indexers", default="zero-shot,auto", help="comma list: zero-shot, auto (shipped), or folders")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = ap.parse_args()
    model, tok = load_on(args.model, "auto", progress=False)
    dtype = model.dtype
    lsa = LSAConfig(budget=args.budget).with_page_chunks(backbone_spec(model).default_page_chunks())
    rows = []
    for length in (int(x) for x in args.lengths.split(",")):
        for s in range(args.samples):
            task = planted_fact(tok, length, seed=args.seed + s)
            runs = [("full", "full", None)] + [(f"lsa/{ix}", "lsa", ix) for ix in args.indexers.split(",")]
            for name, method, indexer in runs:
                t0 = time.perf_counter()
                res = generate(
                    model,
                    tok,
                    task.prompt,
                    method=method,
                    lsa=lsa,
                    indexer=indexer,
                    max_new_tokens=args.max_new_tokens,
                    cuda_graph=False,
                )
                row = {
                    **res.stats.to_dict(),
                    "length": length,
                    "seed": args.seed + s,
                    "method": name,
                    "correct": task.is_correct(res.text),
                    "answer": res.text.strip()[:80],
                    "wall_seconds": time.perf_counter() - t0,
                }
                rows.append(row)
                print(json.dumps({k: row[k] for k in ("length", "method", "correct", "kv_bytes_device", "kv_ratio")}))
    meta = {
        **provenance("benchmarks/kv_memory.py", vars(args)),
        "model": args.model,
        "dtype": str(dtype),
        "lsa": {
            "budget": lsa.budget,
            "chunk_size": lsa.chunk_size,
            "page_chunks": lsa.page_chunks,
            "interval": lsa.interval,
            "recent": lsa.recent,
            "sink": lsa.sink,
            "query_window": lsa.query_window,
            "indexer": "zero-shot",
        },
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "kv_memory.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    (args.out / "kv_memory.md").write_text(markdown(meta, rows))
    print(markdown(meta, rows))


def markdown(meta: dict, rows: list[dict]) -> str:
    lines = [
        f"# Peak device KV: full vs LSA ({meta['model']}, {meta['dtype']})",
        "",
        f"Machine: {meta['machine']} · commit `{meta['commit']}` · LSA budget {meta['lsa']['budget']} "
        "(`lsa/auto` = the shipped trained indexer)",
        "",
        f"Command: `{meta['command']}`",
        "",
        "| context | method | correct | peak device KV (MiB) | full KV (MiB) | ratio | allocator after prefill (MiB) "
        "| allocator decode peak (MiB) | decode tok/s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    groups: dict[tuple[int, str], list[dict]] = {}
    for r in rows:
        groups.setdefault((r["length"], r["method"]), []).append(r)
    mib = 2**20
    for (length, method), rs in sorted(groups.items()):

        def avg(key, rs=rs):
            vals = [r[key] for r in rs if r.get(key) is not None]
            return sum(vals) / len(vals) if vals else float("nan")

        tps = sum(r["new_tokens"] for r in rs) / max(1e-9, sum(r["decode_seconds"] for r in rs))
        lines.append(
            f"| {length} | {method} | {sum(r['correct'] for r in rs)}/{len(rs)} | {avg('kv_bytes_device') / mib:.1f} "
            f"| {avg('kv_bytes_full') / mib:.1f} | {avg('kv_ratio'):.3f} | {avg('allocator_kv_bytes') / mib:.1f} "
            f"| {avg('allocator_decode_peak_bytes') / mib:.1f} | {tps:.1f} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
