"""Attention feedback replayed from a dump, as the runtime would have counted it.

The runtime sees the prompt window whole (the prefill attends to everything) and, after that, only the chunks of
the resident set chosen at the last boundary. Replaying a dump step by step, with the same boundaries and the
same share of resident chunks, gives the feedback inputs the head gets at every step. Where the dump recorded each
layer's mass per chunk, a step's consensus is recomputed over the resident chunks alone (exactly what the
runtime's renormalised attention gives); older dumps fall back to the full-attention golden set cut to the
resident chunks.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from ..indexer.feedback import FeedbackSpec, chunk_distance, consensus, feedback_features
from .dataset import PromptExamples

# chooses a boundary's scores from the features there: [N, F] -> [N]
Chooser = Callable[[torch.Tensor], torch.Tensor]


def head_chooser(head: torch.nn.Module) -> Chooser:
    """Boundary scores from a feedback head (for replays that follow the head's own choices)."""

    def choose(features: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            p = next(head.parameters())
            return head(features.to(p.device, p.dtype)).float().cpu()

    return choose


def counts_chooser(features: torch.Tensor) -> torch.Tensor:
    """Untrained feedback: prompt-window plus decode consensus rates, newer chunks first on ties."""
    recency = -features[..., 7] * 1e-3
    return features[..., 1] + features[..., 3] + recency


def replay_features(
    ex: PromptExamples,
    spec: FeedbackSpec,
    indexer_logit: torch.Tensor,
    *,
    interval: int,
    choose: Chooser = counts_chooser,
) -> torch.Tensor:
    """Feedback features at every step of one prompt, with boundaries every ``interval`` steps from step 0.

    At each boundary ``choose`` scores the candidates and the best ``spec.kept`` of them, with every chunk that
    is not a candidate (sink, tail, chunks completed since), are resident until the next boundary.

    Args:
        ex: one prompt (needs ``golden``; uses ``prompt_hits`` and ``layer_mass`` when the dump has them).
        spec: feedback settings.
        indexer_logit: the query tower's logit at every step. # [S, N]
        interval: decode steps per cycle.
        choose: scores at a boundary from its features.

    Returns:
        Features. # [S, N, F]
    """
    if ex.golden is None:
        raise ValueError("this prompt has no per-step golden labels")
    n, steps = ex.keys.shape[2], ex.num_steps
    if ex.prompt_hits is not None:
        prompt_hits, rows = ex.prompt_hits, ex.prompt_rows
    else:  # a dump without prompt-window labels: the prompt's last token alone
        prompt_hits, rows = ex.golden[0].long(), 1
    resident = torch.ones(n, dtype=torch.bool)
    seen_hits: list[torch.Tensor] = []
    seen_resident: list[torch.Tensor] = []
    out = []
    for t in range(steps):
        if t >= 1:
            if ex.layer_mass is not None:
                hit = consensus(ex.layer_mass[t].float(), spec, resident)
            else:
                hit = ex.golden[t] & resident
            seen_hits.append(hit)
            seen_resident.append(resident)
        lo = max(0, len(seen_hits) - spec.window)
        decode_steps = len(seen_hits) - lo
        if decode_steps:
            hits = torch.stack(seen_hits[lo:]).sum(0)
            res = torch.stack(seen_resident[lo:]).sum(0)
        else:
            hits = res = torch.zeros(n, dtype=torch.long)
        distance = chunk_distance(n, int(ex.positions[t]), ex.chunk_size)
        feats = feedback_features(indexer_logit[t], prompt_hits, rows, hits, res, decode_steps, distance, spec.window)
        out.append(feats)
        if t % interval == 0:
            resident = _resident_set(choose(feats), ex.candidates[t], spec.kept)
    return torch.stack(out)


def _resident_set(scores: torch.Tensor, candidates: torch.Tensor, kept: float) -> torch.Tensor:
    """The best ``kept`` share of the candidates, plus every chunk that is not one. # [N]"""
    idx = candidates.nonzero().flatten()
    chosen = ~candidates.clone()
    if idx.numel():
        k = max(1, math.ceil(kept * idx.numel()))
        chosen[idx[torch.argsort(scores[idx], descending=True)[:k]]] = True
    return chosen
