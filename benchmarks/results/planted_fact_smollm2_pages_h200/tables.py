"""Tables of this folder from its rows: correct answers per setting, method and length.

python benchmarks/results/planted_fact_smollm2_pages_h200/tables.py > tables.md
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

HERE = Path(__file__).parent
LENGTHS = (2048, 4096, 6144, 7168)


def table(rows: list[dict], title: str) -> str:
    # full attention is decoded in every run; the runs of one seed range agree on it (see the README)
    count: dict[tuple, list[int]] = defaultdict(lambda: [0, 0])
    ratio: dict[tuple, float] = defaultdict(float)
    for r in rows:
        setting = (
            "–"
            if r["method"] == "full"
            else f"{r['page_chunks']} / {r['keys']}" + (f" / {r['other']}" if r["other"] else "")
        )
        key = (r["method"], setting, r["length"])
        if r["method"] == "full" and count[key][1] >= _seeds(rows, r["length"]):
            continue  # the same seeds decoded again by another run
        count[key][0] += bool(r["correct"])
        count[key][1] += 1
        ratio[key] = max(ratio[key], r["kv_ratio"])
    lines = [
        f"### {title}",
        "",
        "| method | page chunks / first-boundary keys | " + " | ".join(f"{n // 1024}K" for n in LENGTHS) + " |",
        "|---|---|" + "---:|" * len(LENGTHS),
    ]
    for method, setting in sorted({(m, s) for m, s, _ in count}, key=lambda k: (k[0] != "full", k)):
        cells = []
        for n in LENGTHS:
            c = count.get((method, setting, n))
            cells.append(f"{c[0]}/{c[1]}" if c else "")
        lines.append(f"| {method} | {setting} | " + " | ".join(cells) + " |")
    worst = max((v for (m, _, _), v in ratio.items() if m != "full"), default=0.0)
    lines += ["", f"Largest device KV / full of any LSA answer: {worst:.3f}.", ""]
    return "\n".join(lines)


def _seeds(rows: list[dict], length: int) -> int:
    return len({r["seed"] for r in rows if r["length"] == length})


def main() -> None:
    dev = [json.loads(line) for line in (HERE / "dev_rows.jsonl").open()]
    held = [json.loads(line) for line in (HERE / "heldout_rows.jsonl").open()]
    print(table(dev, "Dev: seeds 1000–1099 (100 per length)"))
    print(table([r for r in held if r["seed"] >= 2000], "Held-out: seeds 2000–2099 (100 per length)"))
    print(table([r for r in held if r["seed"] < 2000], "Held-out: seeds 200–209 (10 per length)"))


if __name__ == "__main__":
    main()
