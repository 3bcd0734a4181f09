"""tower_slots on the dev dump: recall of the runtime page choice for shares 0, 0.25, 0.5.

python dev_tower_slots.py DEV_DUMP
"""

import json
import shutil
import sys
from pathlib import Path

from flashmemory.train.indexer_eval import evaluate_methods

src = Path("/work/main/src/flashmemory/checkpoints/smollm2-135m")
for share in (0.0, 0.25, 0.5):
    d = Path(f"/tmp/share_{share}")
    shutil.rmtree(d, ignore_errors=True)
    shutil.copytree(src, d)
    c = json.loads((d / "config.json").read_text())
    c["spec"]["feedback"]["tower_slots"] = share
    (d / "config.json").write_text(json.dumps(c))
    for steps in ("all", "boundary"):
        r = evaluate_methods([sys.argv[1]], d, split="train", steps=steps)
        m = r["methods"]
        print(
            share,
            steps,
            "runtime",
            [round(x, 3) for x in m["trained, as the runtime chooses"]["recall"]],
            "recent",
            [round(x, 3) for x in m["recent"]["recall"]],
            "head",
            round(m["trained"]["recall"][3], 3),
            flush=True,
        )
