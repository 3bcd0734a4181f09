"""Where the tower puts its first-boundary picks, per held-out prompt: python first_boundary_picks.py DUMP CKPT

For each validation prompt: its length, kind, recall of the step-0 golden lookahead at 15% kept by the tower alone,
the first 12 of the chosen chunks (sorted), and the range of the tower's logits over the candidates.
"""

import math
import sys

import torch

from flashmemory.indexer.checkpoint import load_indexer
from flashmemory.train.dataset import load_examples
from flashmemory.train.scorers import indexer_logits

dump, ckpt = sys.argv[1], sys.argv[2]
indexer = load_indexer(ckpt)
rows = []
for ex in load_examples([dump], split="validation", interval=64, recent=64):
    z = indexer_logits(indexer, ex, torch.tensor([0]), window=16)[0].cpu()
    idx = ex.candidates[0].nonzero().flatten()
    top = idx[torch.argsort(z[idx], descending=True)[: math.ceil(0.15 * idx.numel())]]
    need = ex.targets[0] & ex.candidates[0]
    recall = float(need[top].sum() / max(int(need.sum()), 1))
    rows.append(
        (
            int(ex.positions[0]),
            f"{int(ex.positions[0])} {ex.kind} chunks {ex.keys.shape[2]} recall {recall:.3f} picks "
            f"{sorted(top.tolist())[:12]} ... logits {float(z[idx].min()):.1f}..{float(z[idx].max()):.1f}",
        )
    )
for _, line in sorted(rows):
    print(line)
