"""How each next token is chosen, and where an answer's text ends.

Greedy decoding (the default) makes answers reproducible and comparable between LSA and full attention, which is
what the benchmarks need. Serving needs sampling too: OpenAI-style clients send a temperature, and many send one
above 0 by default. LSA does not care how the token is chosen: the resident pages follow the hidden states of
whatever tokens were chosen.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Sampling:
    """Settings of the next-token choice.

    Args:
        temperature: 0 picks the most likely token (greedy); above 0 samples from the softmax of the logits
            divided by it. Default: 0.
        top_p: nucleus sampling: sample among the most likely tokens whose probabilities first reach ``top_p``
            (at least one). 1 keeps all. Default: 1.
        top_k: sample among the ``top_k`` most likely tokens; 0 keeps all. Default: 0.
        seed: seed of the draws, so that a request can be repeated; None draws a fresh one. Default: None.
    """

    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None

    def __post_init__(self) -> None:
        if not 0 <= self.temperature <= 100:
            raise ValueError(f"temperature must be in [0, 100], got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def chooser(self, device: torch.device):
        """A function ``logits [B, V] -> token ids [B]`` drawing from its own generator on ``device``."""
        if self.greedy:
            return lambda logits: logits.argmax(-1)
        gen = torch.Generator(device=device)
        if self.seed is None:
            gen.seed()
        else:
            gen.manual_seed(self.seed)
        return lambda logits: sample(logits, self, gen)


def sample(logits: torch.Tensor, s: Sampling, generator: torch.Generator | None = None) -> torch.Tensor:
    """One token per row, drawn under ``s`` (temperature, then top-k, then top-p). # [B] from [B, V]"""
    scores = logits.float() / s.temperature
    if s.top_k and s.top_k < scores.shape[-1]:
        kth = scores.topk(s.top_k, dim=-1).values[..., -1:]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if s.top_p < 1:
        sorted_scores, order = scores.sort(dim=-1, descending=True)
        probs = sorted_scores.softmax(-1)
        # drop a token when the ones before it already reach top_p: the first always stays
        drop = probs.cumsum(-1) - probs >= s.top_p
        scores = scores.scatter(-1, order, sorted_scores.masked_fill(drop, float("-inf")))
    return torch.multinomial(scores.softmax(-1), 1, generator=generator).squeeze(-1)


class StopText:
    """Ends each answer at the first of its stop strings, as OpenAI's ``stop`` does: the text ends before it.

    ``update`` is called with every step's tokens and returns the rows whose decoded text now holds a stop string;
    the decode loop then treats them as finished. ``cut`` gives a row's tokens and text up to the stop.

    Args:
        tokenizer: decodes the generated ids.
        stops: the stop strings of each row (an empty list: none for that row).
    """

    def __init__(self, tokenizer, stops: list[list[str]]) -> None:
        if any(s == "" for row in stops for s in row):
            raise ValueError("a stop string is empty")
        self.tokenizer = tokenizer
        self.stops = [list(row) for row in stops]
        self.ids: list[list[int]] = [[] for _ in stops]
        self.ended_at: list[int | None] = [None] * len(stops)  # tokens up to the one that completed a stop
        self.longest = max((len(s) for row in self.stops for s in row), default=0)  # longest stop string of any row

    @classmethod
    def same_for_all(cls, tokenizer, stop: str | list[str] | None, rows: int) -> StopText | None:
        """The same stop string or strings for every one of ``rows``; None when there are none."""
        return cls(tokenizer, [stop_list(stop)] * rows) if stop else None

    def update(self, tokens: torch.Tensor, finished: torch.Tensor | None = None) -> torch.Tensor:
        """Take one step's tokens ``[B]``; returns which rows end now. # [B] bool

        ``finished`` marks rows that had ended before this step (at an EOS): their tokens are only repeats.
        """
        out = torch.zeros(len(self.stops), dtype=torch.bool)
        skip = [False] * len(self.stops) if finished is None else finished.tolist()
        for b, tok in enumerate(tokens.tolist()):
            if self.ended_at[b] is not None or not self.stops[b] or skip[b]:
                continue
            self.ids[b].append(tok)
            # a stop string is short: only the newest tokens' text can complete one
            tail = self.tokenizer.decode(self.ids[b][-(self.longest + 8) :], skip_special_tokens=True)
            if any(s in tail for s in self.stops[b]):
                self.ended_at[b] = len(self.ids[b])
                out[b] = True
        return out.to(tokens.device)

    def cut(self, b: int, token_ids: list[int], text: str) -> tuple[list[int], str, bool]:
        """Row ``b``'s tokens (through the one that completed its stop string) and text (before the stop string),
        and whether a stop string ended it."""
        n = self.ended_at[b]
        if n is None or n > len(token_ids):  # none, or one beyond the tokens kept (a row's own token limit)
            return token_ids, text, False
        token_ids = token_ids[:n]
        text = self.tokenizer.decode(token_ids, skip_special_tokens=True)
        return token_ids, cut_at_stop(text, self.stops[b]), True


def stop_list(stop: str | list[str] | None) -> list[str]:
    """Stop strings as a list, from one string, several, or none (as OpenAI's ``stop`` takes them)."""
    return [stop] if isinstance(stop, str) else list(stop or [])


def cut_at_stop(text: str, stops: list[str]) -> str:
    """``text`` up to the earliest occurrence of any of ``stops`` (all of it when none occurs)."""
    at = min((i for i in (text.find(s) for s in stops) if i >= 0), default=len(text))
    return text[:at]


def held_back(text: str, stops: list[str]) -> int:
    """How many characters at the end of ``text`` could still begin a stop string (a stream waits for them)."""
    for n in range(min(len(text), max((len(s) for s in stops), default=1) - 1), 0, -1):
        if any(s.startswith(text[-n:]) for s in stops):
            return n
    return 0


class TextStream:
    """An answer's text as its tokens come, in pieces safe to show: never the first part of a character split
    across tokens, and never text that could still begin one of ``stops`` (held back until the next token tells,
    so no part of a stop string is ever shown)."""

    def __init__(self, tokenizer, stops: list[str] | None = None) -> None:
        self.tokenizer, self.stops = tokenizer, list(stops or [])
        self.tokens: list[int] = []
        self.shown = ""

    def push(self, token: int) -> str:
        """The piece ``token`` adds to what was shown ("" when nothing new can be shown yet)."""
        self.tokens.append(token)
        text = self.tokenizer.decode(self.tokens, skip_special_tokens=True)
        if text.endswith("\ufffd"):  # a character split across tokens: wait for the rest of it
            return ""
        if self.stops:
            cut = cut_at_stop(text, self.stops)
            text = cut if len(cut) < len(text) else text[: len(text) - held_back(text, self.stops)]
        return self._advance(text)

    def finish(self, text: str) -> str:
        """What the final answer ``text`` adds to what was shown: text held back that is not part of a stop string."""
        return self._advance(text)

    def _advance(self, text: str) -> str:
        if len(text) <= len(self.shown):
            return ""
        piece, self.shown = text[len(self.shown) :], text
        return piece


__all__ = ["Sampling", "StopText", "TextStream", "cut_at_stop", "held_back", "sample", "stop_list"]
