"""Exploratory probes of the golden label on a validation dump (parameter-free; nothing here is tuned).

    python label_probes.py hybrid DUMP CKPT   # half recent-only, half an indexer (interleaved orders)
    python label_probes.py past DUMP          # score = golden in the steps t-63 .. t (attention already seen)
    python label_probes.py mass DUMP [W]      # the target layers' true softmax attention of the query window
    python label_probes.py where DUMP         # where the golden chunks beyond recency lie
    python label_probes.py feedback DUMP      # "past", seeing only the chunks a 15% resident set held

``hybrid`` and ``mass`` need a dump made with ``--token-keys``. Each prints recall at the kept fractions as JSON.
"""

import collections
import json
import math
import sys
from pathlib import Path

import torch

from flashmemory.dump.labels import from_csr
from flashmemory.dump.shards import iter_records
from flashmemory.indexer.checkpoint import load_indexer
from flashmemory.models.adapter import apply_rope
from flashmemory.train.dataset import load_examples
from flashmemory.train.metrics import RecallCurve
from flashmemory.train.scorers import indexer_logits, recent_scores


def validation(dump: Path):
    return load_examples([dump], split="validation", interval=64, recent=64)


def as_json(curves: dict[str, RecallCurve]) -> str:
    table = {
        k: {f"{f:.0%}": round(r, 3) for f, r in zip(c.fractions, c.recall(), strict=True)} for k, c in curves.items()
    }
    return json.dumps(table, indent=1)


def interleave(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Scores whose order alternates between the orders of ``a`` and ``b``, skipping repeats."""
    n = a.numel()
    orders = [torch.argsort(a, descending=True).tolist(), torch.argsort(b, descending=True).tolist()]
    heads, seen, order = [0, 0], set(), []
    while len(order) < n:
        for src in (0, 1):
            lst = orders[src]
            while heads[src] < n and lst[heads[src]] in seen:
                heads[src] += 1
            if heads[src] < n:
                seen.add(lst[heads[src]])
                order.append(lst[heads[src]])
    s = torch.empty(n)
    s[torch.tensor(order)] = -torch.arange(n, dtype=torch.float)
    return s


def hybrid(dump: Path, ckpt: str) -> str:
    zero, trained = load_indexer(dump / "init_indexer"), load_indexer(ckpt)
    names = ["recent", "zs_tok", "zs", "trained", "recent|zs_tok", "recent|zs", "trained|zs_tok"]
    curves = {k: RecallCurve() for k in names}
    for ex in validation(dump):
        steps = torch.arange(ex.num_steps)
        zs_tok = torch.cat([indexer_logits(zero, ex, p, window=16, token_keys=True) for p in steps.split(16)])
        zs, tr = indexer_logits(zero, ex, steps, window=16), indexer_logits(trained, ex, steps, window=16)
        rec = recent_scores(ex, steps)
        for s in steps.tolist():
            c, t = ex.candidates[s], ex.targets[s, ex.candidates[s]]
            sc = {"recent": rec[s, c], "zs_tok": zs_tok[s, c], "zs": zs[s, c], "trained": tr[s, c]}
            sc["recent|zs_tok"] = interleave(sc["recent"], sc["zs_tok"])
            sc["recent|zs"] = interleave(sc["recent"], sc["zs"])
            sc["trained|zs_tok"] = interleave(sc["trained"], sc["zs_tok"])
            for k, v in sc.items():
                curves[k].add(v, t, None)
    return as_json(curves)


def past(dump: Path) -> str:
    """Golden in steps max(0, t-63) .. t, from full attention over every chunk (at step 0: the prefill's last
    token; later LSA would see it for resident chunks only); ties broken by recency. Step t's target (steps
    t+1 .. t+64) is never part of it."""
    prompts = validation(dump)
    recs = [rec for _, rec in iter_records(dump, "validation")]
    names = ["past attention", "recent", "oracle"]
    curves = {k: RecallCurve() for k in names + [f"{k}, step 0 only" for k in names]}
    for ex, rec in zip(prompts, recs, strict=True):
        n = ex.keys.shape[2]
        g = golden_steps(rec, n)
        cum = torch.cat([torch.zeros(1, n), g.cumsum(0)])
        recency = torch.arange(n, dtype=torch.float) / n  # < 1: only breaks ties
        for t in range(ex.num_steps):
            c, y = ex.candidates[t], ex.targets[t, ex.candidates[t]]
            scores = {
                "past attention": (cum[t + 1] - cum[max(0, t - 63)] + recency)[c],
                "recent": recency[c],
                "oracle": ex.targets[t].float()[c],
            }
            for k, v in scores.items():
                curves[k].add(v, y, None)
                if t == 0:
                    curves[f"{k}, step 0 only"].add(v, y, None)
    return as_json(curves)


def golden_steps(rec: dict, n: int) -> torch.Tensor:
    """Per-step golden flags. # [S, N]"""
    ids = from_csr(rec)
    g = torch.zeros(len(ids), n)
    for s, chunk_ids in enumerate(ids):
        g[s, chunk_ids] = 1
    return g


def feedback(dump: Path, kept: float = 0.15, boundaries: tuple[int, ...] = (16, 32)) -> str:
    """Attention feedback as LSA could see it. Step 0 (the prefill's last token) is seen whole. At step 0 a
    resident set of ``kept`` of the candidates is chosen, by recency or by step 0's golden chunks; during the
    next steps only the golden chunks inside it are seen. At a later boundary t, chunks score by how often they
    were seen golden (ties by recency), against the target of steps t+1 .. t+64. "past, all seen" is the same
    with every chunk visible."""
    names = ["recent", "past, all seen", "feedback, resident set by recency", "feedback, resident set by step 0"]
    curves = {k: RecallCurve() for k in names + ["oracle"]}
    recs = [rec for _, rec in iter_records(dump, "validation")]
    for ex, rec in zip(validation(dump), recs, strict=True):
        n = ex.keys.shape[2]
        g = golden_steps(rec, n)
        recency = torch.arange(n, dtype=torch.float) / n
        cand0 = ex.candidates[0]
        k = max(1, math.ceil(kept * int(cand0.sum())))
        resident = {}
        for name, score in (("recency", recency), ("step 0", g[0] + recency)):
            chosen = torch.zeros(n, dtype=torch.bool)
            idx = cand0.nonzero().flatten()
            chosen[idx[torch.argsort(score[idx], descending=True)[:k]]] = True
            resident[name] = chosen | ~cand0  # the sink and the tail are always resident
        for t in boundaries:
            if t >= ex.num_steps:
                continue
            c, y = ex.candidates[t], ex.targets[t, ex.candidates[t]]
            seen_all = g[: t + 1].sum(0)
            scores = {"recent": recency, "past, all seen": seen_all + recency, "oracle": ex.targets[t].float()}
            for name, res in resident.items():
                seen = g[0] + (g[1 : t + 1] * res.float()).sum(0)
                scores[f"feedback, resident set by {name}"] = seen + recency
            for key, v in scores.items():
                curves[key].add(v[c], y, None)
    return as_json(curves)


def mass(dump: Path, window: int = 16) -> str:
    """Softmax over every earlier key (sink and tail included, as in the model), summed per chunk, averaged over
    heads, max over the window, added over the target layers; the queries are the backbone's own (q_proj)."""
    zero = load_indexer(dump / "init_indexer")
    size = zero.spec.chunk_size
    curves = {k: RecallCurve() for k in ("attention mass", "attention mass, step 0 only")}
    with torch.no_grad():
        for ex in validation(dump):
            n = ex.keys.shape[2]
            steps = torch.arange(ex.num_steps)
            hidden, pos, valid = ex.windows(steps, window)
            score = torch.zeros(len(steps), n)
            for j in range(len(zero.target_layers)):
                q, _ = zero.tower(j, hidden[:, :, j].float())
                q = apply_rope(q, pos, zero.inv_freq[j], zero.spec.rope_scaling[j])  # [S, W, H, D]
                k = ex.token_keys[j].float()  # [Hkv, T, D]
                s_, w_, h, d = q.shape
                qg = q.reshape(s_, w_, k.shape[0], h // k.shape[0], d)
                logits = torch.einsum("swkgd,ktd->swkgt", qg, k) / math.sqrt(d)
                future = torch.arange(k.shape[1])[None, None, :] > pos[:, :, None]
                logits = logits.masked_fill(future[:, :, None, None, :], float("-inf"))
                m = logits.softmax(-1).unflatten(-1, (n, size)).sum(-1).mean((2, 3))  # [S, W, N]
                score += m.masked_fill(~valid[..., None], 0.0).amax(1)
            for i, st in enumerate(steps.tolist()):
                c, y = ex.candidates[st], ex.targets[st, ex.candidates[st]]
                curves["attention mass"].add(score[i, c], y, None)
                if st == 0:
                    curves["attention mass, step 0 only"].add(score[i, c], y, None)
    return as_json(curves)


def where(dump: Path) -> str:
    deciles, total, far, persist = collections.Counter(), 0, 0, []
    for ex in validation(dump):
        for s in range(ex.num_steps):
            c = ex.candidates[s].nonzero().flatten()
            if len(c) == 0:
                continue
            recent = set(c[-max(1, math.ceil(0.15 * len(c))) :].tolist())
            for ch in ex.targets[s].nonzero().flatten().tolist():
                total += 1
                if ch not in recent:
                    far += 1
                    rel = (ch - int(c[0])) / max(1, int(c[-1]) - int(c[0]))
                    deciles[min(9, int(rel * 10))] += 1
        persist.append(ex.targets.float().mean(0)[ex.targets.any(0)])
    p = torch.cat(persist)
    return json.dumps(
        {
            "golden targets": total,
            "outside the 15% most recent candidates": far,
            "their tenth of the candidate range, oldest first": [deciles[i] for i in range(10)],
            "share of its prompt's steps a target chunk is a target in, quantiles 0.1/0.25/0.5/0.75/0.9": [
                round(float(p.quantile(q)), 2) for q in (0.1, 0.25, 0.5, 0.75, 0.9)
            ],
        },
        indent=1,
    )


if __name__ == "__main__":
    probe, dump, rest = sys.argv[1], Path(sys.argv[2]), sys.argv[3:]
    probes = {
        "hybrid": hybrid,
        "past": past,
        "mass": lambda d, *a: mass(d, *map(int, a)),
        "where": where,
        "feedback": feedback,
    }
    print(probes[probe](dump, *rest))
