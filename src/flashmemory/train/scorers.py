"""Chunk scorers evaluated on dumps: the indexer (trained or zero-shot) and the baselines it must beat."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..indexer.memory_indexer import MemoryIndexer
from ..models.adapter import apply_rope
from .dataset import PromptExamples


def indexer_logits(
    indexer: MemoryIndexer,
    ex: PromptExamples,
    steps: torch.Tensor,
    reduce: str | None = None,
    window: int = 1,
    token_keys: bool = False,
) -> torch.Tensor:
    """Indexer logits for ``steps`` of one prompt, max over a lookahead window and combined over layers.

    Args:
        indexer: the scorer.
        ex: one prompt's examples.
        steps: which steps to score. # [S]
        reduce: ``"max"`` or ``"mean"`` over target layers; None: the indexer's own (``spec.layer_reduce``).
        window: newest steps forming each query (the runtime's ``query_window``). Default: 1.
        token_keys: score each chunk as its best token (needs a dump made with ``--token-keys``), as the runtime
            does at boundaries set to token keys, instead of by its mean key.

    Returns:
        Logits. # [S, N]
    """
    device = indexer.inv_freq.device
    hidden, pos, valid = ex.windows(steps, window)
    hidden = hidden.to(device, torch.float32)  # [S, W, L, hidden]
    pos, valid = pos.to(device), valid.to(device)
    if token_keys and ex.token_keys is None:
        raise ValueError("this dump has no token keys: dump again with --token-keys")
    per_layer = []
    for j in range(len(indexer.target_layers)):
        keys = ex.keys[j].to(device, torch.float32).unsqueeze(0).expand(len(steps), -1, -1, -1)
        tokens = None
        if token_keys:
            tokens = ex.token_keys[j].to(device, torch.float32).unsqueeze(0).expand(len(steps), -1, -1, -1)
        per_layer.append(indexer.layer_logits(j, hidden[:, :, j], pos, keys, valid, token_keys=tokens))
    stacked = torch.stack(per_layer)
    reduce = reduce or indexer.spec.layer_reduce
    return stacked.amax(0) if reduce == "max" else mean_probability_logit(stacked)


def mean_probability_logit(logits: torch.Tensor) -> torch.Tensor:
    """``logit(mean(sigmoid(logits)))`` over the first dimension, computed in log space.

    The runtime averages the layers' probabilities. Training through that average needs gradients for chunks whose
    probability is far below any clamp (a needed chunk the zero-shot tower scores low is the one to learn), so the
    log of the mean and of its complement come from ``logsumexp`` instead of clamping the mean.
    """
    log_count = math.log(logits.shape[0])
    log_p = torch.logsumexp(F.logsigmoid(logits), 0) - log_count
    log_q = torch.logsumexp(F.logsigmoid(-logits), 0) - log_count
    return log_p - log_q


def recent_scores(ex: PromptExamples, steps: torch.Tensor) -> torch.Tensor:
    """Newer chunks first: what a sliding window keeps."""
    n = ex.keys.shape[2]
    return torch.arange(n, dtype=torch.float32).expand(len(steps), -1)


def random_scores(ex: PromptExamples, steps: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    return torch.rand(len(steps), ex.keys.shape[2], generator=generator)


def page_bound_scores(indexer: MemoryIndexer, ex: PromptExamples, steps: torch.Tensor) -> torch.Tensor:
    """Quest-style upper bound of ``q . k`` from per-chunk min/max keys, with the backbone's own queries."""
    hidden = ex.hidden[steps].float()
    pos = ex.positions[steps]
    out = []
    for j in range(len(indexer.target_layers)):
        q, _ = indexer.tower(j, hidden[:, j].to(indexer.inv_freq.device))
        q = apply_rope(q, pos.to(q.device), indexer.inv_freq[j], indexer.spec.rope_scaling[j]).cpu()  # [S, H, D]
        hkv = ex.kmin.shape[1]
        qg = q.view(q.shape[0], hkv, -1, q.shape[-1])  # [S, Hkv, G, D]
        kmin, kmax = ex.kmin[j].float(), ex.kmax[j].float()  # [Hkv, N, D]
        lo = qg.unsqueeze(-2) * kmin[None, :, None]  # [S, Hkv, G, N, D]
        hi = qg.unsqueeze(-2) * kmax[None, :, None]
        bound = torch.maximum(lo, hi).sum(-1) / math.sqrt(q.shape[-1])  # [S, Hkv, G, N]
        out.append(bound.amax((1, 2)))
    return torch.stack(out).amax(0).detach()
