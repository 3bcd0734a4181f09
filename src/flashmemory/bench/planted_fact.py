"""A long document with planted facts and questions about them (the demo, smoke tests and session checks)."""

from __future__ import annotations

import random
from dataclasses import dataclass

from .corpus import filler_text

CITIES = ("Lisbon", "Oslo", "Nairobi", "Lima", "Hanoi", "Quito", "Tbilisi", "Accra", "Riga", "Montevideo")
THINGS = ("archive", "vault", "greenhouse", "observatory", "workshop", "lighthouse", "library", "bakery")


@dataclass(frozen=True, slots=True)
class PlantedFact:
    """A document, a question and the string a correct answer contains."""

    document: str
    question: str
    answer: str
    depth: float

    @property
    def prompt(self) -> str:
        return f"{self.document}\n\nAnswer from the text above. {self.question}"

    def is_correct(self, text: str) -> bool:
        return self.answer.lower() in text.lower()


def _fact(thing: str, city: str, number: int) -> str:
    return f"The access code of the {thing} in {city} is {number}."


def _question(thing: str) -> str:
    return f"What is the access code of the {thing}?"


def planted_fact(tokenizer, num_tokens: int, *, seed: int = 0, depth: float | None = None) -> PlantedFact:
    """Build a ~``num_tokens``-token document with a fact at relative ``depth`` (random when None)."""
    rng = random.Random(seed)
    thing, number = rng.choice(THINGS), rng.randint(1000, 9999)
    fact = _fact(thing, rng.choice(CITIES), number)
    depth = rng.uniform(0.1, 0.9) if depth is None else depth
    paragraphs = filler_text(tokenizer, max(64, num_tokens - 48), seed=seed)
    cut = int(round(depth * len(paragraphs)))
    document = "\n\n".join(paragraphs[:cut] + [fact] + paragraphs[cut:])
    return PlantedFact(document=document, question=_question(thing), answer=str(number), depth=depth)


def planted_facts(tokenizer, num_tokens: int, count: int, *, seed: int = 0) -> list[PlantedFact]:
    """One ~``num_tokens``-token document with ``count`` facts about different places, spread over its depth.

    Every returned item shares the document; each has its own question and answer.
    """
    if not 1 <= count <= len(THINGS):
        raise ValueError(f"count must be in 1..{len(THINGS)}, got {count}")
    rng = random.Random(seed)
    things = rng.sample(THINGS, count)
    numbers = rng.sample(range(1000, 10000), count)
    depths = sorted(rng.uniform(0.1, 0.9) for _ in range(count))
    paragraphs = filler_text(tokenizer, max(64, num_tokens - 48 * count), seed=seed)
    facts = [_fact(thing, rng.choice(CITIES), number) for thing, number in zip(things, numbers, strict=True)]
    cuts = [int(round(d * len(paragraphs))) for d in depths]
    parts, last = [], 0
    for cut, fact in zip(cuts, facts, strict=True):
        parts += paragraphs[last:cut] + [fact]
        last = cut
    document = "\n\n".join(parts + paragraphs[last:])
    return [
        PlantedFact(document=document, question=_question(thing), answer=str(n), depth=d)
        for thing, n, d in zip(things, numbers, depths, strict=True)
    ]
