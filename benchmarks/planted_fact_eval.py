"""Held-out planted-fact questions: full attention vs LSA (zero-shot and trained indexers) at one budget.

    python benchmarks/planted_fact_eval.py --model smollm2-135m --lengths 2048,4096 --samples 10 --budget 0.2 \
        --ckpt src/flashmemory/checkpoints/smollm2-135m --out benchmarks/results/planted_fact_smollm2

``--ckpt`` may be given several times: each checkpoint becomes a method ``lsa-<folder name>`` on the same facts.
Every answer is appended to ``<out>/rows.jsonl`` as it is made, so a run that stops resumes where it stopped when
started again with the same settings (``<out>/settings.json``); other settings are refused for that folder.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from flashmemory import LSAConfig, generate, load_indexer, model_fingerprint
from flashmemory.bench.planted_fact import planted_fact
from flashmemory.bench.record import provenance
from flashmemory.bench.runner import TAIL_ROOM, repair_rows
from flashmemory.indexer.checkpoint import checkpoint_identity
from flashmemory.models.adapter import backbone_spec
from flashmemory.runtime.ask import load_on

ROWS, SETTINGS = "rows.jsonl", "settings.json"


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
    identities = {}
    for ckpt in args.ckpt:
        name = f"lsa-{ckpt.resolve().name}"
        if name in methods:
            raise SystemExit(f"two checkpoints named {ckpt.resolve().name}: give them folders of different names")
        methods[name] = ("lsa", load_indexer(ckpt, fingerprint=model_fingerprint(model), device=device))
        identities[name] = checkpoint_identity(ckpt)
    lsa = LSAConfig(budget=args.budget, **parse_settings(args.lsa))
    resolved = backbone_spec(model).resolve_counts(lsa)
    lengths = [int(x) for x in args.lengths.split(",")]
    # what decides an answer: a folder's rows are only resumed with the same
    settings = {
        "model": args.model,
        "fingerprint": model_fingerprint(model),
        "budget": args.budget,
        "lsa": sorted(args.lsa),
        "max_new_tokens": args.max_new_tokens,
        "checkpoints": identities,
        # unset counts take the backbone's measured ones, which a later version may change; the tail's room
        # decides how many pages the budget holds
        "lsa_resolved": {
            "page_chunks": resolved.page_chunks,
            "follow_chunks": resolved.follow_chunks,
            "tail_room": TAIL_ROOM,
        },
    }
    rows = run(model, tok, methods, lsa, lengths, args.samples, args.seed, args.max_new_tokens, args.out, settings)
    meta = {
        **provenance("benchmarks/planted_fact_eval.py", vars(args)),
        "model": args.model,
        "budget": args.budget,
    }
    (args.out / "planted_fact.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    table = markdown(meta, rows)
    (args.out / "planted_fact.md").write_text(table)
    print(table)


def run(
    model,
    tok,
    methods: dict[str, tuple[str, object]],
    lsa: LSAConfig,
    lengths: list[int],
    samples: int,
    seed: int,
    max_new_tokens: int,
    out: Path,
    settings: dict,
) -> list[dict]:
    """Answer every (length, seed, method) not yet in ``out``'s rows, appending each answer as it is made.

    Returns:
        The rows of this grid, in grid order (rows of other lengths, seeds or methods in the folder are kept on
        disk but left out).

    Raises:
        SystemExit: when ``out`` holds rows made with other settings.
    """
    out.mkdir(parents=True, exist_ok=True)
    recorded = out / SETTINGS
    if recorded.exists() and json.loads(recorded.read_text()) != settings:
        raise SystemExit(f"{out} holds answers made with other settings ({recorded}); use a new --out folder")
    recorded.write_text(json.dumps(settings, indent=1))
    done = {(r["length"], r["seed"], r["method"]): r for r in repair_rows(out / ROWS)}
    with (out / ROWS).open("a") as log:
        for length in lengths:
            for s in range(samples):
                todo = [name for name in methods if (length, seed + s, name) not in done]
                if not todo:
                    continue
                task = planted_fact(tok, length, seed=seed + s)
                for name in todo:
                    method, indexer = methods[name]
                    t0 = time.perf_counter()
                    res = generate(
                        model,
                        tok,
                        task.prompt,
                        method=method,
                        lsa=lsa,
                        indexer=indexer,
                        max_new_tokens=max_new_tokens,
                        cuda_graph=False,
                    )
                    row = {
                        **res.stats.to_dict(),
                        "length": length,
                        "seed": seed + s,
                        "method": name,
                        "correct": task.is_correct(res.text),
                        "answer": res.text.strip()[:80],
                        "wall_seconds": time.perf_counter() - t0,
                    }
                    log.write(json.dumps(row) + "\n")
                    log.flush()
                    done[(length, seed + s, name)] = row
                    print(json.dumps({k: row[k] for k in ("length", "seed", "method", "correct", "kv_ratio")}))
    return [done[(n, seed + s, name)] for n in lengths for s in range(samples) for name in methods]


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
