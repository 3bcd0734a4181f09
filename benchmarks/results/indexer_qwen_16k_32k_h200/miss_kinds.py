"""Which golden chunks the head misses at 15% kept: ever golden before (in the prompt window or an earlier step,
under full attention) or never, and how far back (in chunks).

python miss_kinds.py DUMP[,DUMP...] CKPT MIN_TOKENS
"""

import math
import sys

import torch

from flashmemory.indexer.checkpoint import load_indexer
from flashmemory.indexer.feedback import chunk_distance
from flashmemory.train.dataset import load_examples
from flashmemory.train.feedback_sim import head_chooser, replay_features
from flashmemory.train.scorers import indexer_logits

dirs, ck, minlen = sys.argv[1].split(","), sys.argv[2], int(sys.argv[3])
ind = load_indexer(ck)
spec = ind.feedback_spec
prompts = [p for p in load_examples(dirs, split="validation", interval=64, recent=64) if int(p.positions[0]) >= minlen]
tot = 0
cats = {}
for ex in prompts:
    z = indexer_logits(ind, ex, torch.arange(ex.num_steps), window=16).cpu()
    f = replay_features(ex, spec, z, interval=64, choose=head_chooser(ind.feedback))
    with torch.no_grad():
        s = ind.feedback(f).float()
    n = ex.keys.shape[2]
    ever = (ex.prompt_hits > 0).clone() if ex.prompt_hits is not None else torch.zeros(n, dtype=torch.bool)
    for t in range(ex.num_steps):
        if t >= 1:
            ever |= ex.golden[t]
        c = ex.candidates[t]
        idx = c.nonzero().flatten()
        k = max(1, math.ceil(0.15 * idx.numel()))
        kept = torch.zeros_like(c)
        kept[idx[torch.argsort(s[t, idx], descending=True)[:k]]] = True
        tg = ex.targets[t] & c
        tot += int(tg.sum())
        dist = chunk_distance(n, int(ex.positions[t]), ex.chunk_size)
        for i in (tg & ~kept).nonzero().flatten().tolist():
            dd = int(dist[i])
            b = "<8" if dd < 8 else "<16" if dd < 16 else "<64" if dd < 64 else "<256" if dd < 256 else ">=256"
            key = (bool(ever[i]), b)
            cats[key] = cats.get(key, 0) + 1
print("positives", tot)
for k, v in sorted(cats.items(), key=lambda x: -x[1]):
    print(k, v, f"{v / tot:.3f}")
