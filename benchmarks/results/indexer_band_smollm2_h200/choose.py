"""The dev choice, fixed before the dev run: among the checkpoint shipped before and the candidates, the one whose
smallest margin over full attention across the four lengths is largest; ties go to the most facts over all
lengths, then to the checkpoint shipped before (no change).

    python choose.py dev_rows.jsonl   # prints the chosen method, then each method's facts by length
"""

import json
import sys
from collections import defaultdict

count: dict[str, dict[int, int]] = defaultdict(lambda: defaultdict(int))
seen: dict[str, dict[int, int]] = defaultdict(lambda: defaultdict(int))
for line in open(sys.argv[1]):
    r = json.loads(line)
    count[r["method"]][r["length"]] += r["correct"]
    seen[r["method"]][r["length"]] += 1
lengths = sorted(count["full"])
if any(seen[m][n] != 100 for m in seen for n in lengths):
    raise SystemExit(f"every method needs 100 answers per length: {dict(seen)}")
SHIPPED = "lsa-smollm2-135m"


def key(method: str) -> tuple:
    margin = min(count[method][n] - count["full"][n] for n in lengths)
    return margin, sum(count[method].values()), method == SHIPPED


candidates = sorted((m for m in count if m != "full"), key=key, reverse=True)
print(candidates[0])
for method in ["full", *candidates]:
    print(method, [count[method][n] for n in lengths], "" if method == "full" else key(method))
