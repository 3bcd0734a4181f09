"""Print the dev-split comparison of this run against the zero-shot layer-13 reference: paired means overall, per
length and per task. Run from this folder: ``python compare_dev.py``."""

import collections
import gzip
import json


def load(path: str) -> dict:
    rows = map(json.loads, gzip.open(path, "rt"))
    return {(r["task"], r["length"], r["sample"]): r["score"] for r in rows}


ref = load("../indexer_qwen_long_dump_h200/dev/zs_results.jsonl.gz")
for name in ("L17",):
    rows = load(f"dev/{name}_results.jsonl.gz")
    common = sorted(set(rows) & set(ref))
    mean = lambda d, keys: sum(d[k] for k in keys) / len(keys)  # noqa: E731
    print(f"{name}: {mean(rows, common):.2f} vs zero-shot layer 13 {mean(ref, common):.2f} over {len(common)} items")
    for field, label in ((1, "length"), (0, "task")):
        groups = collections.defaultdict(list)
        for k in common:
            groups[k[field]].append(k)
        for g, keys in sorted(groups.items()):
            print(f"  {label} {g}: {mean(rows, keys):.1f} vs {mean(ref, keys):.1f} ({len(keys)} items)")
