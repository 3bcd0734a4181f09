"""Which of the version 2 feedback inputs (code of commit bae7626) carry the recall: heads on subsets of them,
trained and scored the way `flashmemory train-feedback` and `indexer-eval` do (two replay rounds, the head choosing
its own resident sets).

python ablate.py TRAIN_DIRS HELD_OUT_DIRS SUBSET[,SUBSET...] OUT.json   (dirs comma-separated; subsets: SUBSETS)
"""

import collections
import json
import os
import sys
import time

import torch

from flashmemory.indexer.checkpoint import load_indexer
from flashmemory.indexer.feedback import FeedbackSpec
from flashmemory.train.dataset import load_examples
from flashmemory.train.feedback_sim import counts_chooser, replay_features
from flashmemory.train.metrics import RecallCurve
from flashmemory.train.scorers import indexer_logits

torch.set_num_threads(int(os.environ.get("THREADS", "2")))
LOSS = os.environ.get("LOSS", "bce")  # bce (as train-feedback) or listwise (softmax over each step's candidates)
BASE = list(range(8))
SUBSETS = {
    "v1": BASE,
    "v2": list(range(15)),
    "v1+votes": BASE + [8],
    "v1+recent": BASE + [9],
    "v1+before": BASE + [10, 11, 12],
    "v1+after": BASE + [13, 14],
    "v2-votes": BASE + [9, 10, 11, 12, 13, 14],
}
KEPT = 0.15

indexer = load_indexer("src/flashmemory/checkpoints/smollm2-135m")
spec = FeedbackSpec(**{**indexer.feedback_spec.to_dict(), "version": 2})
train_dirs, eval_dirs, names = sys.argv[1].split(","), sys.argv[2].split(","), sys.argv[3].split(",")
kw = {"interval": 64, "recent": 64}
train = load_examples(train_dirs, split="train", **kw)
dev = load_examples(train_dirs, split="validation", **kw)
held_out = load_examples(eval_dirs, split="validation", **kw)
logits = {
    id(ex): indexer_logits(indexer, ex, torch.arange(ex.num_steps), window=16).detach() for ex in train + dev + held_out
}
first_round = {}


def bucket(ex) -> str:
    lo = int(ex.positions[0]) // 2048 * 2
    return f"{lo}-{lo + 2}K"


def rows(examples, choose, sample, cols):
    gen = torch.Generator().manual_seed(0)
    out = []
    for ex in examples:
        if choose is counts_chooser:  # the first round's replay is the same for every subset
            if id(ex) not in first_round:
                first_round[id(ex)] = replay_features(ex, spec, logits[id(ex)], interval=64, choose=counts_chooser)
            f = first_round[id(ex)]
        else:
            f = replay_features(ex, spec, logits[id(ex)], interval=64, choose=choose)
        steps = torch.arange(ex.num_steps)
        if sample and ex.num_steps > 48:
            steps = steps[torch.randperm(ex.num_steps, generator=gen)[:48]]
        for t in steps.tolist():
            c = ex.candidates[t]
            if c.any():
                out.append((f[t, c][:, cols], ex.targets[t, c], bucket(ex)))
    return out


def recall(score, rows_, by_length=False):
    curves = collections.defaultdict(lambda: RecallCurve(fractions=(KEPT,)))
    with torch.no_grad():
        for x, y, b in rows_:
            s = score(x)
            curves["all"].add(s, y, None)
            curves[b].add(s, y, None)
    out = {k: round(v.recall()[0], 4) for k, v in sorted(curves.items())}
    return out if by_length else out["all"]


def listwise(logit, row, slot, target):
    grid = torch.full(target.shape, float("-inf")).index_put((row, slot), logit)
    return -(target * torch.log_softmax(grid, 1).nan_to_num(neginf=0.0)).sum(1).mean()


results = {}
for name in names:
    cols = SUBSETS[name]
    torch.manual_seed(0)
    head = torch.nn.Sequential(torch.nn.Linear(len(cols), 32), torch.nn.SiLU(), torch.nn.Linear(32, 1))
    score = lambda x, h=head: h(x).squeeze(-1)  # noqa: E731
    t0 = time.time()
    choose = counts_chooser
    dev_recall = []
    for _round in range(2):
        train_rows, dev_rows = rows(train, choose, True, cols), rows(dev, choose, False, cols)
        x = torch.cat([r[0] for r in train_rows])
        y = torch.cat([r[1] for r in train_rows]).float()
        pos_weight = (y.numel() - y.sum()) / y.sum()
        # listwise: each step's candidates padded into one row; the target spreads evenly over its needed chunks
        width = max(len(r[1]) for r in train_rows)
        slot = torch.cat([torch.arange(len(r[1])) for r in train_rows])
        row = torch.cat([torch.full((len(r[1]),), i) for i, r in enumerate(train_rows)])
        target = torch.zeros(len(train_rows), width).index_put_((row, slot), y)
        target = target / target.sum(1, keepdim=True).clamp(min=1)

        opt = torch.optim.AdamW(head.parameters(), lr=0.01, weight_decay=1e-4)
        best, state = -1.0, None
        for it in range(400):
            logit = head(x).squeeze(-1)
            if LOSS == "listwise":
                loss = listwise(logit, row, slot, target)
            else:
                loss = torch.nn.functional.binary_cross_entropy_with_logits(logit, y, pos_weight=pos_weight)
            opt.zero_grad()
            loss.backward()
            opt.step()
            if (it + 1) % 20 == 0:
                r = recall(score, dev_rows)
                if r > best:
                    best, state = r, {k: v.detach().clone() for k, v in head.state_dict().items()}
        head.load_state_dict(state)
        dev_recall.append(best)
        choose = (lambda h, c: lambda f: h(f[..., c]).squeeze(-1).detach())(head, cols)
    held = recall(score, rows(held_out, choose, False, cols), by_length=True)
    results[name] = {"dev_recall_by_round": dev_recall, "held_out_recall": held, "seconds": round(time.time() - t0)}
    print(name, json.dumps(results[name]), flush=True)
oracle_rows = rows(held_out, counts_chooser, False, BASE)
results["oracle"] = {"held_out_recall": recall(lambda x: x, [(y.float(), y, b) for _, y, b in oracle_rows], True)}
print("oracle", json.dumps(results["oracle"]), flush=True)
json.dump(results, open(sys.argv[4], "w"), indent=1)
