"""Recall of golden chunks against the fraction of chunks kept."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

DEFAULT_FRACTIONS = (0.02, 0.05, 0.1, 0.15, 0.2, 0.3, 0.5)


@dataclass(slots=True)
class RecallCurve:
    """Micro-averaged recall at each kept fraction, plus threshold metrics.

    Args:
        fractions: kept fractions of the candidate chunks.
        hits: golden chunks inside the kept set, per fraction.
        positives: golden chunks in total.
        kept_at_threshold: candidates whose score clears the threshold.
        hits_at_threshold: golden chunks among them.
        candidates: candidate chunks in total.
    """

    fractions: tuple[float, ...] = DEFAULT_FRACTIONS
    hits: list[float] = field(default_factory=list)
    positives: float = 0.0
    kept_at_threshold: float = 0.0
    hits_at_threshold: float = 0.0
    candidates: float = 0.0

    def __post_init__(self) -> None:
        if not self.hits:
            self.hits = [0.0] * len(self.fractions)

    def add(self, scores: torch.Tensor, targets: torch.Tensor, threshold: float | None = 0.5) -> None:
        """Add one query's candidate scores ``[n]`` and golden flags ``[n]``."""
        n = scores.numel()
        pos = float(targets.sum())
        if n == 0 or pos == 0:
            return
        order = torch.argsort(scores, descending=True)
        ranked = targets[order].float().cumsum(0)
        for i, f in enumerate(self.fractions):
            k = max(1, math.ceil(f * n))
            self.hits[i] += float(ranked[min(k, n) - 1])
        self.positives += pos
        self.candidates += n
        if threshold is not None:
            kept = scores > threshold
            self.kept_at_threshold += float(kept.sum())
            self.hits_at_threshold += float((kept & targets).sum())

    def recall(self) -> list[float]:
        return [h / self.positives if self.positives else 0.0 for h in self.hits]

    def summary(self) -> dict:
        kept = self.kept_at_threshold / self.candidates if self.candidates else 0.0
        recall_t = self.hits_at_threshold / self.positives if self.positives else 0.0
        precision = self.hits_at_threshold / self.kept_at_threshold if self.kept_at_threshold else 0.0
        f1 = 2 * precision * recall_t / (precision + recall_t) if precision + recall_t else 0.0
        out = {f"recall@{f:g}": r for f, r in zip(self.fractions, self.recall(), strict=True)}
        out.update({"fraction_kept": kept, "recall_at_kept": recall_t, "f1_at_threshold": f1})
        return out
