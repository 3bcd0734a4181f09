"""RULER's aggregation tasks: common words (``common_words_extraction.py``) and frequent words
(``freq_words_extraction.py``)."""

from __future__ import annotations

import random
import string
from typing import Any

import numpy as np

from flashmemory.bench.ruler.data import wonder_words
from flashmemory.bench.ruler.prompt import Prompt


def riemann_zeta(s: float, terms: int = 1000) -> float:
    """Riemann zeta for ``s > 1`` by Euler-Maclaurin; RULER uses scipy's, which this matches to ~1e-15."""
    if s <= 1:
        raise ValueError("zeta diverges for s <= 1")
    head = sum(k**-s for k in range(1, terms))
    n = float(terms)
    tail = n ** (1 - s) / (s - 1) + n**-s / 2 + s * n ** (-s - 1) / 12 - s * (s + 1) * (s + 2) * n ** (-s - 3) / 720
    return head + tail


class CommonWordsBuilder:
    """A numbered word list where ten words repeat far more often than the rest, preceded by a solved example."""

    def __init__(self, args: dict[str, Any], spec: dict[str, Any], *, seed: int, length: int) -> None:
        self.freq_cw, self.freq_ucw, self.num_cw = args["freq_cw"], args["freq_ucw"], args["num_cw"]
        self.template, self.prefix = spec["template"], spec["answer_prefix"]
        self.seed = seed
        self.short = length < 4096  # RULER uses fewer repeats below 4K so the list is still long enough
        lists = wonder_words()
        words = sorted(set(lists["noun"] + lists["adjective"] + lists["verb"]))
        random.Random(seed).shuffle(words)
        self.words = words
        self.max_size = len(words)

    def min_size(self, index: int) -> int:
        """The common words alone."""
        return self.num_cw

    def _example(self, rng: random.Random, num_words: int, common: int, uncommon: int) -> tuple[str, list[str]]:
        chosen = rng.sample(self.words, num_words)
        frequent, rare = chosen[: self.num_cw], chosen[self.num_cw :]
        word_list = frequent * common + rare * uncommon
        random.Random(self.seed).shuffle(word_list)
        return " ".join(f"{i + 1}. {word}" for i, word in enumerate(word_list)), frequent

    def build(self, rng: random.Random, size: int, index: int) -> Prompt:
        """The solved example, then a list built from ``size`` distinct words."""
        if self.short:
            shot_context, shot_answer = self._example(rng, 20, 3, 1)
            context, answer = self._example(rng, size, 6, 1)
        else:
            shot_context, shot_answer = self._example(rng, 40, 10, 3)
            context, answer = self._example(rng, size, self.freq_cw, self.freq_ucw)
        shot = (
            self.template.format(context=shot_context, query="")
            + self.prefix
            + " ".join(f"{i + 1}. {word}" for i, word in enumerate(shot_answer))
        )
        return Prompt(shot + "\n" + self.template.format(context=context, query=""), self.prefix, answer)


class FrequentWordsBuilder:
    """Random six-letter "coded" words drawn from a Zipf law; the answer is the three most frequent ones."""

    max_size = None
    coded_wordlen = 6

    def __init__(self, args: dict[str, Any], spec: dict[str, Any], *, seed: int, length: int) -> None:
        self.alpha = float(args["alpha"])
        self.vocab_size = length // 50  # RULER's default when --vocab_size is -1
        self.template, self.prefix = spec["template"], spec["answer_prefix"]
        self.seed = seed

    def min_size(self, index: int) -> int:
        """Enough words that the top ranks occur at least once."""
        return 10

    def build(self, rng: random.Random, size: int, index: int) -> Prompt:
        """About ``size`` coded words (the Zipf counts are truncated, as in RULER)."""
        vocab = ["".join(rng.choices(string.ascii_lowercase, k=self.coded_wordlen)) for _ in range(self.vocab_size)]
        while len(set(vocab)) < self.vocab_size:
            vocab.append("".join(rng.choices(string.ascii_lowercase, k=self.coded_wordlen)))
        vocab = sorted(set(vocab))
        random.Random(self.seed).shuffle(vocab)
        vocab[0] = "..."  # RULER makes the most frequent "word" noise the model is told to ignore
        ranks = np.arange(1, len(vocab) + 1)
        counts = (size * (ranks**-self.alpha) / riemann_zeta(self.alpha)).astype(int)
        sampled = [word for word, n in zip(vocab, counts, strict=True) for _ in range(int(n))]
        random.Random(self.seed).shuffle(sampled)
        return Prompt(self.template.format(context=" ".join(sampled), query=""), self.prefix, vocab[1:4])
