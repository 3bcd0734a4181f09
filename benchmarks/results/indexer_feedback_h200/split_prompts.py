"""Split a prompt file into dump parts: held-out prompts apart; every tenth training prompt becomes dev."""

import gzip
import json
import sys

src, out, parts = sys.argv[1], sys.argv[2], int(sys.argv[3])
rows = [json.loads(line) for line in gzip.open(src, "rt")]
train = [r for r in rows if r["split"] == "train"]
evals = [r for r in rows if r["split"] == "validation"]
for i, r in enumerate(train):
    if i % 10 == 9:
        r["split"] = "validation"
for i in range(parts):
    if train:
        open(f"{out}/train{i}.jsonl", "w").writelines(json.dumps(r) + "\n" for r in train[i::parts])
    if evals:
        open(f"{out}/eval{i}.jsonl", "w").writelines(json.dumps(r) + "\n" for r in evals[i::parts])
print(src, len(train), "train (", sum(r["split"] == "validation" for r in train), "dev )", len(evals), "eval")
