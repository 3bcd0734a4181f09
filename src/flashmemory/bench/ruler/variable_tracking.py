"""RULER's variable tracking task (``data/synthetic/variable_tracking.py``), with its one-shot example."""

from __future__ import annotations

import random
import string
from collections.abc import Callable
from typing import Any

from flashmemory.bench.ruler.prompt import Prompt, fit_size

NOISE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again.\n"
# RULER fits its in-context example to 500 tokens including 30 generated ones, independent of the target length.
ICL_LENGTH = 500


class VariableTrackingBuilder:
    """Chains ``VAR X = ...`` hidden in repeated noise, preceded by a fixed-size solved example."""

    max_size = None

    def __init__(self, args: dict[str, Any], spec: dict[str, Any], *, seed: int, count: Callable[[str], int]) -> None:
        self.num_chains = args["num_chains"]
        self.num_hops = args["num_hops"]
        self.template, self.prefix = spec["template"], spec["answer_prefix"]
        self.icl = self._icl_example(random.Random(f"{seed}:vt-icl"), count, ICL_LENGTH - spec["tokens_to_generate"])

    def min_size(self, index: int) -> int:
        """One noise line; RULER then splits it into sentences to make room for the chain."""
        return 1

    def _chains(self, rng: random.Random, is_icl: bool) -> tuple[list[list[str]], list[list[str]]]:
        name_len = 3 if is_icl else 5
        hops = min(10, self.num_hops) if is_icl else self.num_hops
        # RULER appends until the set is large enough but keeps duplicates in the list, which can yield a
        # malformed extra chain; drawing distinct names directly avoids that.
        names: list[str] = []
        while len(names) < (hops + 1) * self.num_chains:
            name = "".join(rng.choices(string.ascii_uppercase, k=name_len))
            if name not in names:
                names.append(name)
        variables, chains = [], []
        for i in range(0, len(names), hops + 1):
            chain_vars = names[i : i + hops + 1]
            variables.append(chain_vars)
            chain = [f"VAR {chain_vars[0]} = {rng.randint(10000, 99998)}"]
            chain += [f"VAR {chain_vars[j + 1]} = VAR {chain_vars[j]} " for j in range(hops)]
            chains.append(chain)
        return variables, chains

    def _generate(self, rng: random.Random, num_noises: int, is_icl: bool) -> Prompt:
        variables, chains = self._chains(rng, is_icl)
        sentences = [NOISE] * num_noises
        if len(sentences) <= len(chains[0]):
            pieces = [piece for noise in sentences for piece in noise.split(".")]
            sentences = [p + "." if len(p.strip()) > 0 else p for p in pieces]
            if len(sentences) <= len(chains[0]):
                chains = [chain[: len(sentences) - 1] for chain in chains]
        for chain in chains:
            positions = sorted(rng.sample(range(len(sentences)), len(chain)))
            for offset, position in enumerate(positions):
                sentences.insert(position + offset, chain[offset])
        context = " ".join(sentences).replace(". \n", ".\n")
        value = chains[0][0].split("=")[-1].strip()
        fields = dict(context=context, query=value, num_v=self.num_hops + 1)
        return Prompt(self.template.format(**fields), self.prefix.format(**fields), variables[0])

    def _icl_example(self, rng: random.Random, count: Callable[[str], int], budget: int) -> str:
        state = rng.getstate()

        def sized(n: int) -> Prompt:
            rng.setstate(state)
            return self._generate(rng, n, is_icl=True)

        size = fit_size(lambda n: count(sized(n).text), budget, low=1, high=None)
        example = sized(size)
        return example.text + " " + " ".join(example.outputs) + "\n\n"

    def _randomize_icl(self, rng: random.Random) -> str:
        # RULER renames the example's variables per sample so the answer cannot be copied from it.
        marker = self.prefix[-10:]
        cut = self.icl.index(marker)
        example = self.icl
        for name in example[cut + len(marker) :].strip().split():
            example = example.replace(name, "".join(rng.choices(string.ascii_uppercase, k=len(name))))
        return example

    def build(self, rng: random.Random, size: int, index: int) -> Prompt:
        """The solved example, then a chain hidden among ``size`` noise lines."""
        prompt = self._generate(rng, size, is_icl=False)
        return Prompt(" " + self._randomize_icl(rng) + "\n\n" + prompt.body, prompt.answer_prefix, prompt.outputs)
