"""Tables of this folder: dev split against the zero-shot reference run, held-out split paired with zero-shot.

Usage: ``python compare.py`` (from this folder). Scores are RULER's own (``score`` of each result row, 0-100).
The interval is a paired bootstrap over items (2000 resamples, seed 0).
"""

import gzip
import json
from collections import defaultdict
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
DEV_REF = HERE.parent / "indexer_qwen_long_dump_h200" / "dev" / "zs_results.jsonl.gz"


def load(path: Path) -> dict:
    with gzip.open(path, "rt") as f:
        return {(r["task"], r["length"], r["sample"]): r["score"] for r in map(json.loads, f)}


def paired(cand: dict, ref: dict) -> tuple[list, np.ndarray, np.ndarray]:
    keys = sorted(set(cand) & set(ref))
    return keys, np.array([cand[k] for k in keys]), np.array([ref[k] for k in keys])


def interval(diff: np.ndarray) -> tuple[float, float]:
    rng = np.random.default_rng(0)
    means = diff[rng.integers(0, len(diff), (2000, len(diff)))].mean(axis=1)
    return float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))


def line(name: str, cand: dict, ref: dict) -> str:
    keys, a, b = paired(cand, ref)
    lo, hi = interval(a - b)
    by_len = defaultdict(list)
    for k, x, y in zip(keys, a, b, strict=True):
        by_len[k[1]].append(x - y)
    lens = " | ".join(f"{np.mean(by_len[n]):+.2f}" for n in sorted(by_len))
    return (
        f"| {name} | {len(keys)} | {a.mean():.2f} | {b.mean():.2f} | **{a.mean() - b.mean():+.2f}** "
        f"| [{lo:+.2f}, {hi:+.2f}] | {lens} |"
    )


def per_task(names: list[str], split: str, ref: dict) -> None:
    rows = {n: load(HERE / split / f"{n}_results.jsonl.gz") for n in names}
    tasks = sorted({k[0] for k in ref})
    print(f"\n| task ({split}) | zero-shot | " + " | ".join(names) + " |")
    print("|---|---:|" + "---:|" * len(names))
    for t in tasks:
        cells = []
        for n in names:
            keys, a, b = paired({k: v for k, v in rows[n].items() if k[0] == t}, ref)
            cells.append(f"{a.mean() - b.mean():+.1f}")
        base = np.mean([v for k, v in ref.items() if k[0] == t])
        print(f"| {t} | {base:.1f} | " + " | ".join(cells) + " |")


def main() -> None:
    header = "| indexer | paired items | mean | zero-shot | Δ | 95% interval of Δ | Δ 4K | Δ 8K | Δ 16K |"
    sep = "|---|---:|---:|---:|---:|---|---:|---:|---:|"
    ref = load(DEV_REF)
    print("Dev split (seed 1), against the zero-shot reference run of indexer_qwen_long_dump_h200/dev:\n")
    print(header + "\n" + sep)
    for name in ("B20", "B35", "T", "TB"):
        print(line(name, load(HERE / "dev" / f"{name}_results.jsonl.gz"), ref))
    zs = load(HERE / "heldout" / "zs_results.jsonl.gz")
    print("\nHeld-out split (seed 3), zero-shot in the same run:\n")
    print(header + "\n" + sep)
    for name in ("B35", "TB"):
        print(line(name, load(HERE / "heldout" / f"{name}_results.jsonl.gz"), zs))
    per_task(["B35", "TB"], "heldout", zs)


if __name__ == "__main__":
    main()
