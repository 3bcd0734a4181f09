"""What the shipped checkpoint misses at 15% kept, by what the attention feedback had said about the chunk.

- seen: the prompt window or the decode window had the chunk golden (the head had its count and ranked it out);
- next to seen: not seen, but a neighbouring chunk was;
- unseen: neither; only the tower could have found it;
- of those, golden at some earlier step with full attention (what a longer feedback memory could have kept).

python misses.py HELD_OUT_DIR[,DIR...] [CKPT]
"""

import collections
import math
import sys

import torch

from flashmemory.indexer.checkpoint import load_indexer
from flashmemory.train.dataset import load_examples
from flashmemory.train.feedback_sim import head_chooser, replay_features
from flashmemory.train.scorers import indexer_logits

KEPT = 0.15
indexer = load_indexer(sys.argv[2] if len(sys.argv) > 2 else "src/flashmemory/checkpoints/smollm2-135m")
examples = load_examples(sys.argv[1].split(","), split="validation", interval=64, recent=64)
needed = collections.Counter()
kept = collections.Counter()
oracle = collections.Counter()
missed = collections.Counter()
for ex in examples:
    z = indexer_logits(indexer, ex, torch.arange(ex.num_steps), window=16).detach()
    f = replay_features(ex, indexer.feedback_spec, z, interval=64, choose=head_chooser(indexer.feedback))
    with torch.no_grad():
        scores = indexer.feedback(f)
    n = ex.keys.shape[2]
    lo = int(ex.positions[0]) // 4096 * 4096
    group = f"{lo}-{lo + 4095} tokens"
    for t in range(ex.num_steps):
        c = ex.candidates[t]
        y = ex.targets[t] & c
        if not y.any():
            continue
        idx = c.nonzero().flatten()
        k = max(1, math.ceil(KEPT * idx.numel()))
        top = torch.zeros(n, dtype=torch.bool)
        top[idx[torch.argsort(scores[t, idx], descending=True)[:k]]] = True
        seen = (f[t, :, 1] > 0) | (f[t, :, 3] > 0)  # prompt-window or decode consensus rate
        near = torch.zeros(n, dtype=torch.bool)
        near[1:] |= seen[:-1]
        near[:-1] |= seen[1:]
        miss = y & ~top
        ever = ex.golden[: t + 1].any(0)
        for g in (group, "all"):
            needed[g] += int(y.sum())
            kept[g] += int((y & top).sum())
            oracle[g] += min(int(y.sum()), k)
            missed[(g, "seen")] += int((miss & seen).sum())
            missed[(g, "next to seen")] += int((miss & ~seen & near).sum())
            missed[(g, "unseen")] += int((miss & ~seen & ~near).sum())
            missed[(g, "unseen, golden before")] += int((miss & ~seen & ~near & ever).sum())
COLUMNS = ("missed, seen", "missed, next to seen", "missed, unseen", "of those, golden before")
print("| prompts | needed chunks | recall | oracle | " + " | ".join(COLUMNS) + " |")
print("|---|---:|---:|---:|---:|---:|---:|---:|")
for g in sorted(needed, key=lambda g: (g == "all", g)):
    n = needed[g]
    cells = [f"{missed[(g, m)] / n:.3f}" for m in ("seen", "next to seen", "unseen", "unseen, golden before")]
    print(f"| {g} | {n} | {kept[g] / n:.3f} | {oracle[g] / n:.3f} | " + " | ".join(cells) + " |")
