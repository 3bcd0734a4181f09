"""What every RULER task builder produces, and how a haystack size is fitted to a token budget."""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True)
class Prompt:
    """One generated example: the prompt before RULER's answer prefix, the prefix, and the reference answers."""

    body: str
    answer_prefix: str
    outputs: list[str]

    @property
    def text(self) -> str:
        """The full input as RULER writes it for its ``base`` model template: body then answer prefix."""
        return self.body + self.answer_prefix


class TaskBuilder(Protocol):
    """A RULER base task whose prompt grows with an integer haystack size (words, sentences, documents...)."""

    max_size: int | None

    def min_size(self, index: int) -> int:
        """Smallest size that still yields a valid prompt for sample ``index``."""
        ...

    def build(self, rng: random.Random, size: int, index: int) -> Prompt:
        """Sample ``index`` with a haystack of ``size`` units, drawing all randomness from ``rng``."""
        ...


def fit_size(count: Callable[[int], int], budget: int, *, low: int, high: int | None) -> int:
    """Largest size in ``[low, high]`` whose prompt has at most ``budget`` tokens (``low`` if none does).

    RULER walks sizes in fixed increments, which at short lengths can land 20% under budget; doubling then
    bisecting reaches the same "largest that fits" with a resolution of about 0.5% in a few dozen tokenizations.
    """
    if count(low) > budget:
        return low
    fits, too_big = low, None
    while too_big is None:
        probe = max(fits * 2, fits + 1)
        if high is not None:
            probe = min(probe, high)
        if probe == fits:
            return fits
        if count(probe) <= budget:
            fits = probe
        else:
            too_big = probe
    while too_big - fits > max(1, fits // 200):
        mid = (fits + too_big) // 2
        if count(mid) <= budget:
            fits = mid
        else:
            too_big = mid
    return fits


def fit_sample(
    build: Callable[[int], Prompt],
    count: Callable[[str], int],
    budget: int,
    *,
    start: int,
    low: int,
    high: int | None,
    max_steps: int = 16,
) -> tuple[Prompt, int]:
    """Sample-specific size near ``start``: shrink until it fits (as RULER does), or grow while it still fits.

    Growing matters where units vary in length (QA documents); the calibration sample says little about others.
    """
    step = max(1, start // 100)
    size = max(low, start)
    prompt = build(size)
    tokens = count(prompt.text)
    for _ in range(max_steps):
        if tokens > budget and size > low:
            size = max(low, size - step)
            prompt = build(size)
            tokens = count(prompt.text)
            continue
        if tokens <= budget and (high is None or size < high):
            bigger = size + step if high is None else min(high, size + step)
            candidate = build(bigger)
            candidate_tokens = count(candidate.text)
            if candidate_tokens <= budget:
                size, prompt, tokens = bigger, candidate, candidate_tokens
                continue
        break
    while tokens > budget and size > low:  # never hand back an over-budget prompt that could still shrink
        size = max(low, size - step)
        prompt = build(size)
        tokens = count(prompt.text)
    return prompt, tokens
