"""Prompt files for the feedback dumps: python make_prompts.py MODEL OUT.jsonl.gz SPEC [SPEC...] (see README)."""

import collections
import gzip
import json
import sys

from flashmemory.dump.spec import build_prompts
from flashmemory.models.loader import load_model

model, out = sys.argv[1], sys.argv[2]
_, tok = load_model(model, device="cpu", progress=False)
rows = []
for spec in sys.argv[3:]:
    ps = build_prompts(spec, tok)
    if "val=0" not in spec:
        ps = [p for p in ps if p.split == "validation"]
    rows += ps
with gzip.open(out, "wt") as f:
    for p in rows:
        f.write(
            json.dumps(
                {
                    "text": p.text,
                    "kind": p.kind,
                    "doc_ids": list(p.doc_ids),
                    "split": p.split,
                    "answer_prefix": p.answer_prefix,
                }
            )
            + "\n"
        )
print(out, collections.Counter((p.split, p.kind) for p in rows))
