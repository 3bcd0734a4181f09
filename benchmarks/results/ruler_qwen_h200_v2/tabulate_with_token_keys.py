"""The README's tables: this grid's rows with the default `lsa` (token keys) paired in from its two folders.

Run from this folder: `python tabulate_with_token_keys.py`. Only items that every method and the default `lsa`
finished are counted, so every column is over the same samples.
"""

import collections
import json
from statistics import mean

METHODS = ["full", "lsa_tok", "lsa", "quest", "snapkv", "keydiff", "tova", "streamingllm", "expected-attention"]
METHODS += ["recent", "random"]
LENGTHS = [4096, 8192, 16384, 32768]


def read(path: str) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f]


by_item: dict[tuple, dict] = collections.defaultdict(dict)
for r in read("results.jsonl"):
    by_item[(r["task"], r["length"], r["sample"])][r["method"]] = r
for folder in ("../ruler_qwen_h200_v2_token_keys_short", "../ruler_qwen_h200_v2_token_keys"):
    for r in read(f"{folder}/results.jsonl"):
        key = (r["task"], r["length"], r["sample"])
        if key in by_item:
            by_item[key]["lsa_tok"] = r
common = {k: v for k, v in by_item.items() if len(v) == len(METHODS)}
print("items", len(common), "per length", [sum(1 for k in common if k[1] == n) for n in LENGTHS])


def score(method: str, length: int, task: str | None = None) -> float:
    """Mean over tasks of the per-task mean (or one task's mean) at one length."""
    per_task = collections.defaultdict(list)
    for (t, n, _), v in common.items():
        if n == length and task in (None, t):
            per_task[t].append(v[method]["score"])
    return mean(mean(x) for x in per_task.values())


def kv(method: str, length: int) -> float:
    return mean(v[method]["kv_ratio"] for (_, n, _), v in common.items() if n == length)


for m in METHODS:
    ratios = [kv(m, n) for n in LENGTHS]
    cells = " | ".join(f"{score(m, n):.1f}" for n in LENGTHS)
    print(f"| {m} | {min(ratios):.1%}–{max(ratios):.1%} | {cells} |")
for other in ("full", "quest", "snapkv"):
    print(f"lsa_tok − {other}:", [round(score("lsa_tok", n) - score(other, n), 1) for n in LENGTHS])

rows = []
for task in sorted({k[0] for k in common}):
    d = {m: mean(score(m, n, task) for n in LENGTHS) for m in ("full", "lsa_tok", "lsa", "quest", "snapkv")}
    rows.append((d["lsa_tok"] - d["full"], task, sum(1 for k in common if k[0] == task), d))
for gap, task, n, d in sorted(rows):
    print(
        f"| `{task}` | {n} | {d['full']:.1f} | {d['lsa_tok']:.1f} | {gap:+.1f} | {d['lsa']:.1f} | {d['quest']:.1f} "
        f"| {d['snapkv']:.1f} |"
    )
