"""RULER's QA tasks (``data/synthetic/qa.py``): a SQuAD or HotpotQA question among distractor documents."""

from __future__ import annotations

import random
from typing import Any

from flashmemory.bench.ruler.data import hotpotqa, squad
from flashmemory.bench.ruler.prompt import Prompt

DOCUMENT_PROMPT = "Document {i}:\n{document}"


class QaBuilder:
    """Sample ``index`` asks question ``index`` of the dataset, as RULER does; the seed picks the distractors."""

    def __init__(self, args: dict[str, Any], spec: dict[str, Any], *, seed: int) -> None:
        dataset = args["dataset"]
        if dataset == "squad":
            self.qas, self.docs = squad()
        elif dataset == "hotpotqa":
            self.qas, self.docs = hotpotqa()
        else:
            raise ValueError(f"unknown RULER QA dataset {dataset!r}")
        self.template, self.prefix = spec["template"], spec["answer_prefix"]
        self.seed = seed
        self.max_size = len(self.docs)

    @property
    def num_questions(self) -> int:
        """How many samples can be generated: one per answerable question."""
        return len(self.qas)

    def min_size(self, index: int) -> int:
        """The question's own documents; RULER cannot build a prompt with fewer (HotpotQA has ten)."""
        return len(self.qas[index]["context"])

    def build(self, rng: random.Random, size: int, index: int) -> Prompt:
        """Question ``index`` with ``size`` documents: its own, same-article ones (SQuAD), then random ones."""
        qa = self.qas[index]
        gold: list[int] = qa["context"]
        related: list[int] = qa.get("more_context", [])
        if size < len(self.docs):
            if size - len(gold) > len(related):
                excluded = set(gold + related)
                others = [i for i in range(len(self.docs)) if i not in excluded]
                chosen = gold + related + rng.sample(others, max(0, size - len(gold) - len(related)))
            else:
                chosen = gold + rng.sample(related, size - len(gold))
            documents = [self.docs[i] for i in chosen]
        else:
            documents = list(self.docs)
        # RULER reseeds this shuffle with the run seed each time, so the gold position depends on seed and count.
        random.Random(self.seed).shuffle(documents)
        context = "\n\n".join(DOCUMENT_PROMPT.format(i=i + 1, document=d) for i, d in enumerate(documents))
        return Prompt(self.template.format(context=context, query=qa["query"]), self.prefix, list(qa["outputs"]))
