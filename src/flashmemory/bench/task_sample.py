"""One prompt of a benchmark task set (RULER, LongBench-v2, LongMemEval).

The runner reads the same fields from every sample (``task``, ``index``, ``input``, ``answer_prefix``,
``outputs``, ``max_new_tokens``...); ``info`` carries what a task set adds to each result row (the item's id,
its difficulty or question type) and ``buckets`` the labels its summary is grouped by.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class TaskSample:
    """One example.

    ``input`` is the whole prompt for a model without a chat template and ends with ``answer_prefix``; with a chat
    template the user turn is ``input`` without that prefix, and the prefix starts the assistant turn.
    ``length`` is the requested total (prompt plus ``max_new_tokens``), ``num_tokens`` the prompt's actual size.
    ``question_marker`` is the text whose last occurrence in ``input`` opens the question, for the protocol that
    sends the question as a second turn after the context (empty: the task set has no such split).
    """

    task: str
    index: int
    input: str
    outputs: list[str]
    length: int
    answer_prefix: str
    num_tokens: int
    max_new_tokens: int
    info: dict[str, Any] = field(default_factory=dict)
    buckets: dict[str, str] = field(default_factory=dict)
    question_marker: str = ""


def chat_overhead(tokenizer, answer_prefix: str = "") -> int:
    """Tokens that the chat template (and the answer prefix after it) add around an empty user turn.

    Prompts are sized so that the encoded chat, not just its user text, plus the generation fits the length.
    """
    extra = len(tokenizer.encode(answer_prefix, add_special_tokens=False)) if answer_prefix else 0
    if not getattr(tokenizer, "chat_template", None):
        return extra
    chat = tokenizer.apply_chat_template([{"role": "user", "content": ""}], tokenize=False, add_generation_prompt=True)
    return extra + len(tokenizer.encode(chat, add_special_tokens=False))


def prompt_budget(tokenizer, length: int, max_new_tokens: int, answer_prefix: str = "") -> int:
    """Tokens left for the user text of a prompt whose total (chat, prefix and generation) is ``length``.

    Raises:
        ValueError: when ``length`` leaves no room for any text.
    """
    budget = length - max_new_tokens - chat_overhead(tokenizer, answer_prefix)
    if budget < 64:
        raise ValueError(f"length {length} leaves {budget} tokens for the prompt; use a length of at least "
                         f"{length - budget + 64} tokens")  # fmt: skip
    return budget
