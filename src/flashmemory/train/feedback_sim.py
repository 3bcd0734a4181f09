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

from ..indexer.feedback import FeedbackCounts, FeedbackSpec, chunk_distance, feedback_features, top_p_sets
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
    is not a candidate (sink, tail, chunks completed since), are resident until the next boundary. The steps of a
    cycle see the same resident set, so their consensus is computed together, and the window counts of every step
    come from running sums.

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
    if spec.version >= 2 and ex.layer_mass is None:
        raise ValueError("a version 2 feedback head needs dumps with per-layer masses (dumped with feedback labels)")
    n, steps = ex.keys.shape[2], ex.num_steps
    if ex.prompt_hits is not None:
        prompt_hits, rows = ex.prompt_hits, ex.prompt_rows
    else:  # a dump without prompt-window labels: the prompt's last token alone
        prompt_hits, rows = ex.golden[0].long(), 1
    # row t: what decode step t saw (row 0 stays empty: step 0 is the prompt's last token)
    hits = torch.zeros(steps, n, dtype=torch.bool)
    resident_rows = torch.zeros(steps, n, dtype=torch.bool)
    votes = torch.zeros(steps, n)
    distance = chunk_distance(n, ex.positions[:steps], ex.chunk_size)  # [S, N]

    def features(ts: torch.Tensor) -> torch.Tensor:
        counts = _window_counts(hits, resident_rows, votes, ts, spec, prompt_hits, rows)
        return feedback_features(indexer_logit[ts], counts, distance[ts], spec)

    for b in range(0, steps, interval):
        resident = _resident_set(choose(features(torch.tensor([b]))[0]), ex.candidates[b], spec.kept)
        lo, hi = b + 1, min(b + interval, steps - 1) + 1
        if lo >= hi:
            continue
        resident_rows[lo:hi] = resident
        if ex.layer_mass is not None:
            sets = top_p_sets(ex.layer_mass[lo:hi].float() * resident.float(), spec.top_p) & resident
            layer_votes = sets.sum(-2)
            hits[lo:hi] = layer_votes >= spec.min_layers
            votes[lo:hi] = layer_votes.float() / ex.layer_mass.shape[-2]
        else:
            hits[lo:hi] = ex.golden[lo:hi] & resident
    return features(torch.arange(steps))


def _window_counts(
    hits: torch.Tensor,
    resident: torch.Tensor,
    votes: torch.Tensor,
    ts: torch.Tensor,
    spec: FeedbackSpec,
    prompt_hits: torch.Tensor,
    prompt_rows: int,
) -> FeedbackCounts:
    """Counts over the last ``spec.window`` decode steps up to each step of ``ts`` (which must share a window fill
    when more than one is asked for: all steps, or one boundary)."""

    def window_sum(x: torch.Tensor, size: int) -> torch.Tensor:
        c = torch.cat([x.new_zeros(1, x.shape[1]), x.cumsum(0)])  # c[t + 1] = rows 0..t
        return c[ts + 1] - c[(ts + 1 - size).clamp(min=0)]

    fill = torch.clamp(ts, max=spec.window)
    recent_fill = torch.clamp(ts, max=spec.recent_steps)
    per_step = len(ts) > 1
    h, r = hits.long(), resident.long()
    return FeedbackCounts(
        prompt_hits=prompt_hits.expand(len(ts), -1),
        prompt_rows=prompt_rows,
        decode_hits=window_sum(h, spec.window),
        resident_steps=window_sum(r, spec.window),
        decode_steps=fill[:, None] if per_step else int(fill[0]),
        votes=window_sum(votes, spec.window),
        recent_hits=window_sum(h, spec.recent_steps),
        recent_steps=recent_fill[:, None] if per_step else int(recent_fill[0]),
    )


def _resident_set(scores: torch.Tensor, candidates: torch.Tensor, kept: float) -> torch.Tensor:
    """The best ``kept`` share of the candidates, plus every chunk that is not one. # [N]"""
    idx = candidates.nonzero().flatten()
    chosen = ~candidates.clone()
    if idx.numel():
        k = max(1, math.ceil(kept * idx.numel()))
        chosen[idx[torch.argsort(scores[idx], descending=True)[:k]]] = True
    return chosen
