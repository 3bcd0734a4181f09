"""Facts found per setting, method and length, from dev_rows.jsonl and heldout_rows.jsonl:
python tables.py > tables.md"""

import json
from collections import defaultdict
from pathlib import Path

HERE = Path(__file__).parent
# the same checkpoint decoded before, with a tail sized for 64 new tokens (its label there: smol_zs)
BEFORE = HERE.parent / "indexer_band_smollm2_h200"


def count(path: Path, method: str) -> tuple[dict[int, int], float]:
    found: dict[int, int] = defaultdict(int)
    worst = 0.0
    for line in path.open():
        r = json.loads(line)
        if r["method"] == method:
            found[r["length"]] += r["correct"]
            worst = max(worst, r["kv_ratio"])
    return found, worst


for split in ("dev", "heldout"):
    found: dict[tuple, dict[int, int]] = defaultdict(lambda: defaultdict(int))
    worst_kv: dict[tuple, float] = defaultdict(float)
    slots: dict[tuple, dict[int, set]] = defaultdict(lambda: defaultdict(set))
    full: dict[tuple, set] = defaultdict(set)
    for line in (HERE / f"{split}_rows.jsonl").open():
        r = json.loads(line)
        key = ("full attention", r["setting"]) if r["method"] == "full" else ("LSA", r["setting"])
        found[key][r["length"]] += r["correct"]
        worst_kv[key] = max(worst_kv[key], r["kv_ratio"])
        if r["page_slots"] is not None:
            slots[key][r["length"]].add(r["page_slots"])
        if r["method"] == "full":
            full[r["seed"], r["length"]].add(r["correct"])
    lengths = sorted(found["full attention", "follow_chunks=0"])
    print(f"## {split}: facts found of 100\n")
    print("| method | run | " + " | ".join(f"{n // 1024}K" for n in lengths) + " | largest device KV / full |")
    print("|---|---|" + "---:|" * (len(lengths) + 1))
    for key in sorted(found):
        cells = " | ".join(str(found[key][n]) for n in lengths)
        print(f"| {key[0]} | {key[1]} | {cells} | {worst_kv[key]:.4f} |")
    before, worst = count(BEFORE / f"{split}_rows.jsonl", "lsa-smol_zs")
    cells = " | ".join(str(before[n]) for n in lengths)
    print(f"| LSA, tail sized for 64 new tokens (before) | follow_chunks=0 | {cells} | {worst:.4f} |")
    print()
    for key in sorted(slots):
        print(
            f"- page slots, {key[0]} {key[1]}: "
            + ", ".join(f"{n // 1024}K {min(slots[key][n])}-{max(slots[key][n])}" for n in lengths)
        )
    split_full = sum(len(v) > 1 for v in full.values())
    print(f"- full attention decoded twice per fact: {split_full} of {len(full)} facts scored differently\n")
