"""Recall at 15% kept per prompt kind, each head replayed with its own resident sets (as indexer-eval's "trained").

python by_kind.py HELD_OUT_DIR[,DIR...] CKPT [CKPT...]   (a version 2 head needs the code of commit bae7626)
"""

import collections
import sys

import torch

from flashmemory.indexer.checkpoint import load_indexer
from flashmemory.train.dataset import load_examples
from flashmemory.train.feedback_sim import head_chooser, replay_features
from flashmemory.train.metrics import RecallCurve
from flashmemory.train.scorers import indexer_logits

examples = load_examples(sys.argv[1].split(","), split="validation", interval=64, recent=64)
for ckpt in sys.argv[2:]:
    indexer = load_indexer(ckpt)
    curves = collections.defaultdict(lambda: RecallCurve(fractions=(0.15,)))
    for ex in examples:
        z = indexer_logits(indexer, ex, torch.arange(ex.num_steps), window=16).detach()
        f = replay_features(ex, indexer.feedback_spec, z, interval=64, choose=head_chooser(indexer.feedback))
        with torch.no_grad():
            s = indexer.feedback(f)
        for t in range(ex.num_steps):
            c = ex.candidates[t]
            for key in ("all", ex.kind):
                curves[key].add(s[t, c], ex.targets[t, c], None)
    print(ckpt, {k: round(v.recall()[0], 3) for k, v in sorted(curves.items())}, flush=True)
