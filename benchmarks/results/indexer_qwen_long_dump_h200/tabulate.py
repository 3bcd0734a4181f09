"""Dev and held-out means, by length and by task, from the recorded rows: `python tabulate.py`."""

import collections
import gzip
import json
from pathlib import Path

HERE = Path(__file__).parent


def load(path: Path) -> dict:
    with gzip.open(path, "rt") as f:
        return {(r["task"], r["length"], r["sample"]): r["score"] for r in map(json.loads, f)}


def report(title: str, runs: dict[str, dict]) -> None:
    common = sorted(set.intersection(*(set(r) for r in runs.values())))
    print(f"## {title}: {len(common)} items every indexer finished\n")
    print("| indexer | " + " | ".join(f"{n // 1024}K" for n in (4096, 8192, 16384)) + " | all |")
    print("|---|---:|---:|---:|---:|")
    for name, rows in runs.items():
        cells = []
        for length in (4096, 8192, 16384, None):
            keys = [k for k in common if length is None or k[1] == length]
            cells.append(f"{sum(rows[k] for k in keys) / len(keys):.1f}")
        print(f"| {name} | " + " | ".join(cells) + " |")
    base = runs["zero-shot"]
    print("\n| task | items | " + " | ".join(f"{n} − zero-shot" for n in runs if n != "zero-shot") + " |")
    print("|---|---:|" + "---:|" * (len(runs) - 1))
    by_task = collections.defaultdict(list)
    for k in common:
        by_task[k[0]].append(k)
    for task, keys in sorted(by_task.items()):
        diffs = [sum(rows[k] - base[k] for k in keys) / len(keys) for n, rows in runs.items() if n != "zero-shot"]
        print(f"| {task} | {len(keys)} | " + " | ".join(f"{d:+.1f}" for d in diffs) + " |")
    print()


if __name__ == "__main__":
    report(
        "Dev split (seed 1)",
        {n: load(HERE / "dev" / f"{f}_results.jsonl.gz") for n, f in (("A", "A"), ("C", "C"), ("zero-shot", "zs"))},
    )
    report(
        "Held-out split (seed 2)",
        {n: load(HERE / "heldout" / f"{f}_results.jsonl.gz") for n, f in (("A", "A"), ("zero-shot", "zs"))},
    )
