"""Facts found per method and length, from dev_rows.jsonl and heldout_rows.jsonl: python tables.py > tables.md"""

import json
from collections import defaultdict
from pathlib import Path

HERE = Path(__file__).parent
NAMES = {
    "full": "full attention",
    "lsa-smollm2-135m": "checkpoint shipped before (layers 15,20,25, trained tower)",
    "lsa-smol_zs": "**band tower, untrained + head (chosen; shipped now)**",
    "lsa-smol_off": "band tower, trained + head",
}
for split in ("dev", "heldout"):
    found: dict[str, dict[int, int]] = defaultdict(lambda: defaultdict(int))
    worst_kv: dict[str, float] = defaultdict(float)
    for line in (HERE / f"{split}_rows.jsonl").open():
        r = json.loads(line)
        found[r["method"]][r["length"]] += r["correct"]
        worst_kv[r["method"]] = max(worst_kv[r["method"]], r["kv_ratio"])
    lengths = sorted(found["full"])
    print(f"## {split}: facts found of 100\n")
    print("| method | " + " | ".join(f"{n // 1024}K" for n in lengths) + " | largest device KV / full |")
    print("|---|" + "---:|" * (len(lengths) + 1))
    for method in NAMES:
        if method in found:
            cells = " | ".join(str(found[method][n]) for n in lengths)
            print(f"| {NAMES[method]} | {cells} | {worst_kv[method]:.3f} |")
    print()
