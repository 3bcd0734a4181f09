"""LongBench-v2's zero-shot prompt, its middle truncation and its answer extraction."""

from __future__ import annotations

import re

from .format import LongBenchItem

# LongBench-v2's ``0shot`` template, field for field.
TEMPLATE = (
    "Please read the following text and answer the question below.\n\n<text>\n{context}\n</text>\n\n"
    "What is the correct answer to this question: {question}\nChoices:\n(A) {a}\n(B) {b}\n(C) {c}\n(D) {d}\n\n"
    'Format your response as follows: "The correct answer is (insert answer here)".'
)
# Where the template's question begins (after the document).
QUESTION_MARKER = "What is the correct answer to this question:"
# The assistant turn starts with the format the template asks for, so even a small model answers with a letter
# that LongBench-v2's own patterns can read; the scorer reads prefix and generation together.
ANSWER_PREFIX = "The correct answer is ("
_WITH_PARENS = re.compile(r"The correct answer is \(([A-D])\)")
_BARE = re.compile(r"The correct answer is ([A-D])")


def render_prompt(item: LongBenchItem) -> str:
    """The user text of ``item`` in LongBench-v2's template (its context stripped, as LongBench-v2 does)."""
    a, b, c, d = (choice.strip() for choice in item.choices)
    return TEMPLATE.format(context=item.context.strip(), question=item.question.strip(), a=a, b=b, c=c, d=d)


def truncate_middle(text: str, tokenizer, budget: int) -> tuple[str, int]:
    """Cut tokens out of the middle of ``text`` until it has at most ``budget`` tokens, as LongBench-v2 does.

    The first and last halves of the budget are kept: the instruction at the start and the question at the end
    both survive. Decoding and re-encoding can shift a token at the seam, so the cut is repeated until it fits.

    Returns:
        The text and its token count.
    """
    ids = tokenizer.encode(text, add_special_tokens=False)
    if len(ids) <= budget:
        return text, len(ids)
    keep = budget
    while keep > 1:
        head = keep // 2
        cut = tokenizer.decode(ids[:head], skip_special_tokens=True) + tokenizer.decode(
            ids[len(ids) - (keep - head) :], skip_special_tokens=True
        )
        num_tokens = len(tokenizer.encode(cut, add_special_tokens=False))
        if num_tokens <= budget:
            return cut, num_tokens
        keep -= num_tokens - budget
    raise ValueError(f"cannot cut the prompt to {budget} tokens")


def extract_choice(response: str) -> str | None:
    """The letter in "The correct answer is (X)" (or "... is X"), after dropping markdown asterisks; else None."""
    response = response.replace("*", "")
    match = _WITH_PARENS.search(response) or _BARE.search(response)
    return match.group(1) if match else None


def score_choice(response: str, answer: str) -> float:
    """100.0 when the extracted letter is ``answer``, else 0.0 (no letter found counts as wrong)."""
    return 100.0 if extract_choice(response) == answer else 0.0
