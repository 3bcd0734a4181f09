"""How much of the golden label attention feedback could keep if every chunk were visible at every step.

python feedback_ceiling.py DUMP[,DUMP...] CKPT MIN_TOKENS

Replays the held-out prompts (at least MIN_TOKENS long) twice: with the runtime's view (a decode step's consensus
over the resident chunks only) and with full attention's view (every chunk), for the untrained counts and the
checkpoint's head. Prints recall at 10/15/20% kept over all steps and over boundary steps.
"""

import sys

import torch

import flashmemory.train.feedback_sim as fs
from flashmemory.indexer.checkpoint import load_indexer
from flashmemory.train.dataset import load_examples
from flashmemory.train.feedback_sim import counts_chooser, head_chooser, replay_features
from flashmemory.train.metrics import RecallCurve
from flashmemory.train.scorers import indexer_logits

dirs, ck, minlen = sys.argv[1].split(","), sys.argv[2], int(sys.argv[3])
ind = load_indexer(ck)
spec = ind.feedback_spec
prompts = [p for p in load_examples(dirs, split="validation", interval=64, recent=64) if int(p.positions[0]) >= minlen]
orig = fs.consensus


def full(lm, spec, visible=None):
    return orig(lm, spec, None)


res = {}
for mode in ("resident", "full"):
    fs.consensus = orig if mode == "resident" else full
    for name, ch in (("counts", counts_chooser), ("head", head_chooser(ind.feedback))):
        cv = RecallCurve(fractions=(0.1, 0.15, 0.2))
        cb = RecallCurve(fractions=(0.1, 0.15, 0.2))
        for ex in prompts:
            z = indexer_logits(ind, ex, torch.arange(ex.num_steps), window=16).cpu()
            f = replay_features(ex, spec, z, interval=64, choose=ch)
            with torch.no_grad():
                s = ch(f)
            for t in range(ex.num_steps):
                c = ex.candidates[t]
                cv.add(s[t, c], ex.targets[t, c], None)
                if t % 64 == 0:
                    cb.add(s[t, c], ex.targets[t, c], None)
        print(
            mode,
            name,
            "all",
            [round(x, 3) for x in cv.recall()],
            "boundary",
            [round(x, 3) for x in cb.recall()],
            flush=True,
        )
