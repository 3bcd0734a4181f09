"""A long document with one planted fact and a question about it (the demo and smoke tests)."""

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


def planted_fact(tokenizer, num_tokens: int, *, seed: int = 0, depth: float | None = None) -> PlantedFact:
    """Build a ~``num_tokens``-token document with a fact at relative ``depth`` (random when None)."""
    rng = random.Random(seed)
    thing, number = rng.choice(THINGS), rng.randint(1000, 9999)
    fact = f"The access code of the {thing} in {rng.choice(CITIES)} is {number}."
    depth = rng.uniform(0.1, 0.9) if depth is None else depth
    paragraphs = filler_text(tokenizer, max(64, num_tokens - 48), seed=seed)
    cut = int(round(depth * len(paragraphs)))
    document = "\n\n".join(paragraphs[:cut] + [fact] + paragraphs[cut:])
    question = f"What is the access code of the {thing}?"
    return PlantedFact(document=document, question=question, answer=str(number), depth=depth)
