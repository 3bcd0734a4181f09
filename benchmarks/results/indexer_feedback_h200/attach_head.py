"""Rebuild a feedback checkpoint of this run from a shipped tower and the head's weights stored here.

    python attach_head.py src/flashmemory/checkpoints/qwen2.5-coder-0.5b head_qwen OUT

The head was trained on top of that tower (same weights), so tower + head is the checkpoint that was evaluated.
"""

import json
import sys
from pathlib import Path

from safetensors.torch import load_file

from flashmemory.indexer.checkpoint import load_indexer, save_indexer
from flashmemory.indexer.feedback import FeedbackSpec

tower, head_dir, out = (Path(a) for a in sys.argv[1:4])
indexer = load_indexer(tower)
config = json.loads((head_dir / "config.json").read_text())
indexer.add_feedback(FeedbackSpec(**config["spec"]["feedback"]))
head = load_file(head_dir / "feedback_head.safetensors")
indexer.feedback.load_state_dict({k.removeprefix("feedback."): v for k, v in head.items()})
extra = {k: v for k, v in config.items() if k not in ("format", "spec")}
save_indexer(indexer, out, extra=extra)
print(f"wrote {out}")
