"""RULER's needle-in-a-haystack family (``data/synthetic/niah.py``), reimplemented without its argparse globals."""

from __future__ import annotations

import random
import uuid
from typing import Any

import numpy as np

from flashmemory.bench.ruler.data import essay_words, wonder_words
from flashmemory.bench.ruler.prompt import Prompt
from flashmemory.bench.ruler.sentences import split_sentences

NEEDLE = "One of the special magic {type_needle_v} for {key} is: {value}."
REPEAT_HAYSTACK = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
DEPTHS = [int(d) for d in np.round(np.linspace(0, 100, num=40, endpoint=True)).astype(int)]


def _singular(template: str) -> str:
    # RULER rewrites the plural template in place when exactly one value is asked for.
    return template.replace("Some", "A").replace("are all", "is").replace("are", "is").replace("answers", "answer")


class NiahBuilder:
    """One niah variant; ``args`` is its entry from RULER's ``synthetic.yaml``."""

    def __init__(self, args: dict[str, Any], spec: dict[str, Any], *, seed: int) -> None:
        self.haystack_type = args["type_haystack"]
        self.key_type = args["type_needle_k"]
        self.value_type = args["type_needle_v"]
        self.num_values = args["num_needle_v"]
        self.num_queries = args["num_needle_q"]
        self.num_keys = max(args["num_needle_k"], self.num_queries)
        self.seed = seed
        template, prefix = spec["template"], spec["answer_prefix"]
        if self.num_queries * self.num_values == 1:
            template, prefix = _singular(template), _singular(prefix)
        self.template, self.prefix = template, prefix
        if "words" in (self.key_type, self.value_type):
            words = wonder_words()
            # RULER picks uniformly from sorted(set(adj-noun)) (6M strings, ~15 s to build); an independent
            # adjective and noun give the same distribution up to the handful of duplicate pairs.
            self.adjectives = sorted(set(words["adjective"]))
            self.nouns = sorted(set(words["noun"]))
        self.max_size = len(essay_words()) if self.haystack_type == "essay" else None

    def min_size(self, index: int) -> int:
        """Essays can shrink to one word; line haystacks need a slot per needle."""
        return 1 if self.haystack_type == "essay" else self.num_keys * self.num_values

    def _random(self, rng: random.Random, kind: str) -> str:
        if kind == "numbers":
            return str(rng.randint(10**6, 10**7 - 1))
        if kind == "words":
            return f"{rng.choice(self.adjectives)}-{rng.choice(self.nouns)}"
        if kind == "uuids":
            return str(uuid.UUID(int=rng.getrandbits(128), version=4))
        raise ValueError(f"unknown needle type {kind!r}")

    def _context(self, rng: random.Random, size: int, needles: list[str]) -> str:
        if self.haystack_type == "essay":
            sentences = split_sentences(" ".join(essay_words()[:size]))
            cuts = sorted(int(len(sentences) * (depth / 100)) for depth in rng.sample(DEPTHS, len(needles)))
            bounds = [0, *cuts, len(sentences)]
            parts: list[str] = []
            for i in range(1, len(bounds)):
                parts.append(" ".join(sentences[bounds[i - 1] : bounds[i]]))
                if i - 1 < len(needles):
                    parts.append(needles[i - 1])
            return " ".join(parts)
        if self.haystack_type == "repeat":
            lines = [REPEAT_HAYSTACK] * size
        else:  # "needle": the haystack is distractor needles with unrelated keys
            lines = [
                NEEDLE.format(
                    type_needle_v=self.value_type,
                    key=self._random(rng, self.key_type),
                    value=self._random(rng, self.value_type),
                )
                for _ in range(size)
            ]
        positions = sorted(rng.sample(range(size), len(needles)), reverse=True)
        for position, needle in zip(positions, needles, strict=True):
            lines.insert(position, needle)
        return "\n".join(lines)

    def build(self, rng: random.Random, size: int, index: int) -> Prompt:
        """A niah prompt with ``size`` essay words or haystack lines."""
        keys: list[str] = []
        values: list[list[str]] = []
        needles: list[str] = []
        for _ in range(self.num_keys):
            keys.append(self._random(rng, self.key_type))
            values.append([self._random(rng, self.value_type) for _ in range(self.num_values)])
            needles += [NEEDLE.format(type_needle_v=self.value_type, key=keys[-1], value=v) for v in values[-1]]
        # RULER reseeds this shuffle with the run seed on every call, so needle order depends on the seed only.
        random.Random(self.seed).shuffle(needles)
        context = self._context(rng, size, needles)
        picked = rng.sample(range(self.num_keys), self.num_queries)
        queries = [keys[i] for i in picked]
        answers = [v for i in picked for v in values[i]]
        query = ", ".join(queries[:-1]) + ", and " + queries[-1] if len(queries) > 1 else queries[0]
        value_type = self.value_type if self.num_queries * self.num_values > 1 else self.value_type[:-1]
        return Prompt(
            body=self.template.format(type_needle_v=value_type, context=context, query=query),
            answer_prefix=self.prefix.format(type_needle_v=value_type, query=query),
            outputs=answers,
        )
