"""Training prompts for a dump, written to JSONL with the validation prompts first.

    python make_prompts.py "n=40,val=10,min=2048,max=4096,seed=3,kinds=copy_back+keyed_fact" prompts.jsonl

A dump stopped by a time limit then still has every validation prompt. The prompts are those that
``flashmemory dump --data SPEC`` builds; only their order differs.
"""

import collections
import json
import sys

from flashmemory.dump.spec import build_prompts
from flashmemory.models.loader import load_model


def main() -> None:
    spec, out = sys.argv[1], sys.argv[2]
    _, tokenizer = load_model("qwen2.5-coder-0.5b", device="cpu", progress=False)
    prompts = build_prompts(spec, tokenizer)
    prompts = [p for p in prompts if p.split == "validation"] + [p for p in prompts if p.split == "train"]
    with open(out, "w", encoding="utf-8") as f:
        for p in prompts:
            row = {
                "text": p.text,
                "kind": p.kind,
                "doc_ids": list(p.doc_ids),
                "split": p.split,
                "answer_prefix": p.answer_prefix,
            }
            f.write(json.dumps(row) + "\n")
    print(collections.Counter((p.split, p.kind) for p in prompts))


if __name__ == "__main__":
    main()
