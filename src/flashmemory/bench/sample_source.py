"""The prompts of a bench run: each (task, length, index) generated and tokenized where it is decoded.

A RULER sample depends only on its index; LongBench-v2 and LongMemEval samples are generated one task and length at
a time. Either way the same settings give the same token ids in any process, so benchmark workers make their own
prompts. Made in the parent process, generating a 32K-token prompt (about a second) took longer than decoding it
with one method, which left the workers of an `lsa`-only run idle.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

from .longbench import generate_longbench
from .longmemeval import generate_longmemeval
from .ruler import generate_ruler


def chat_prompt(tokenizer, text: str, answer_prefix: str) -> str | None:
    """The string :func:`encode_sample` tokenizes for a chat model, or None without a chat template."""
    if not getattr(tokenizer, "chat_template", None):
        return None
    user = text[: len(text) - len(answer_prefix)] if answer_prefix and text.endswith(answer_prefix) else text
    # The blank line that separates a prompt from its answer prefix in plain text is not part of the user turn
    # (RULER's prompts have none there, so this changes nothing for them).
    chat = tokenizer.apply_chat_template(
        [{"role": "user", "content": user.rstrip()}], tokenize=False, add_generation_prompt=True
    )
    return chat + answer_prefix


def encode_sample(
    tokenizer, text: str, answer_prefix: str, question_marker: str | None = None
) -> dict[str, torch.Tensor]:
    """Token ids of one prompt: the chat template around the question, then the answer prefix.

    As RULER does for chat models, the user turn is the prompt without its answer prefix, and the prefix is
    appended after the generation prompt so the model continues the answer. Without a chat template the
    prompt is used as is (it already ends with the prefix).

    With ``question_marker`` the same ids are split where its last occurrence begins: ``input_ids`` is the
    context (prefilled), ``followup_ids`` the question turn from there on (fed through the cache afterwards).
    """
    chat = chat_prompt(tokenizer, text, answer_prefix)
    full_text = chat if chat is not None else text
    special = chat is None
    if not question_marker:
        enc = tokenizer(full_text, return_tensors="pt", add_special_tokens=special)
        ids = torch.as_tensor(enc["input_ids"])
        mask = enc.get("attention_mask") if hasattr(enc, "get") else None
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids) if mask is None else torch.as_tensor(mask)}
    at = full_text.rfind(question_marker)
    if at < 0:
        raise ValueError(f"the prompt has no question marker {question_marker!r} to split the question turn at")
    enc = tokenizer(full_text, add_special_tokens=special, return_offsets_mapping=True)
    ids, offsets = list(enc["input_ids"]), list(enc["offset_mapping"])
    # the first token that reaches into the question; special tokens added in front have empty spans
    split = next(i for i, (a, b) in enumerate(offsets) if b > at and b > a)
    if split == 0:
        raise ValueError("the question marker opens the prompt: there is no context to prefill before it")
    ids_t = torch.tensor([ids])
    return {
        "input_ids": ids_t[:, :split],
        "attention_mask": torch.ones_like(ids_t[:, :split]),
        "followup_ids": ids_t[:, split:],
    }


class SampleSource:
    """Samples of one run, by (task, length, index), with their token ids.

    Args:
        family: task set family (``ruler``, ``longbench-v2`` or ``longmemeval``).
        samples: samples per task and length (LongBench-v2 and LongMemEval generate that many at once).
        seed: generator seed of the run.
        data: published data file (``--data``), or None for the local generators.
        protocol: ``"question-last"`` splits the question turn off the prompt; anything else keeps one prefill.
        ruler: the RULER generator (a module-level function, so that workers can unpickle it).
    """

    def __init__(
        self,
        family: str,
        *,
        samples: int,
        seed: int,
        data: Path | None,
        protocol: str,
        ruler: Callable = generate_ruler,
    ) -> None:
        self.family, self.samples, self.seed, self.data, self.protocol = family, samples, seed, data, protocol
        self.ruler = ruler
        self._generated: dict[tuple[str, int], list] = {}

    def sample(self, task: str, tokenizer, length: int, index: int):
        """Sample ``index`` of a task and length, or None when the task has fewer samples (published data)."""
        if self.family == "ruler":
            # made when first needed: a time-boxed run then pays only for the samples it decodes
            return self.ruler(task, tokenizer, length=length, num_samples=index + 1, seed=self.seed, start=index)[0]
        if (task, length) not in self._generated:
            generate = generate_longbench if self.family == "longbench-v2" else generate_longmemeval
            self._generated[(task, length)] = generate(
                task, tokenizer, length=length, num_samples=self.samples, seed=self.seed, data=self.data
            )
        items = self._generated[(task, length)]
        return items[index] if index < len(items) else None

    def get(self, task: str, tokenizer, length: int, index: int) -> tuple[object, dict[str, torch.Tensor]] | None:
        """``(sample, token ids)`` of one item, or None when the task has fewer samples."""
        sample = self.sample(task, tokenizer, length, index)
        if sample is None:
            return None
        marker = sample.question_marker if self.protocol == "question-last" else None
        return sample, encode_sample(tokenizer, sample.input, sample.answer_prefix, marker)


__all__ = ["SampleSource", "chat_prompt", "encode_sample"]
