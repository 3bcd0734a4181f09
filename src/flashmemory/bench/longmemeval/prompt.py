"""LongMemEval's reading prompt (full history, natural-language session format) and how it is fitted to a budget."""

from __future__ import annotations

from collections.abc import Callable

from .format import MemItem

# LongMemEval's answer prompt without retrieval or chain of thought, field for field.
TEMPLATE = (
    "I will give you several history chats between you and a user. Please answer the question based on the "
    "relevant chat history.\n\n\nHistory Chats:\n\n{history}\n\nCurrent Date: {date}\nQuestion: {question}\nAnswer:"
)

# Where the question begins (after the history): the current date, then the question.
QUESTION_MARKER = "Current Date:"


def session_order(item: MemItem) -> list[int]:
    """Session positions sorted by date (LongMemEval's dates, ``2023/05/20 (Sat) 02:21``, sort as text)."""
    return sorted(range(len(item.sessions)), key=lambda i: item.dates[i])


def render_session(number: int, date: str, turns) -> str:
    """One session in LongMemEval's ``nl`` history format (its ``has_answer`` marks are never shown)."""
    content = "".join(f"\n\n{turn['role']}: {turn['content'].strip()}" for turn in turns)
    return f"\n### Session {number}:\nSession Date: {date}\nSession Content:\n{content}\n"


def render_prompt(item: MemItem, kept: list[int] | None = None) -> str:
    """The prompt over the sessions at positions ``kept`` (default: all), numbered in date order."""
    order = [i for i in session_order(item) if kept is None or i in set(kept)]
    history = "".join(render_session(n + 1, item.dates[i], item.sessions[i]) for n, i in enumerate(order))
    return TEMPLATE.format(history=history, date=item.question_date, question=item.question)


def fit_history(item: MemItem, count: Callable[[str], int], budget: int) -> tuple[str, int, list[int]]:
    """The prompt with the newest sessions that fit ``budget`` tokens: the oldest are dropped first.

    This is how LongMemEval's reader keeps the latest sessions when a history is longer than the model's window.

    Returns:
        The prompt, its token count and the positions of the sessions kept.
    """
    order = session_order(item)
    text = render_prompt(item)
    tokens = count(text)
    if tokens <= budget:
        return text, tokens, order
    # Session sizes add up almost exactly; guess the cut from them, then correct it with whole-prompt counts.
    sizes = [count(render_session(1, item.dates[i], item.sessions[i])) for i in order]
    fixed = count(render_prompt(item, kept=[]))
    start, total = len(order), fixed
    while start > 0 and total + sizes[start - 1] <= budget:
        start -= 1
        total += sizes[start]
    while True:
        text = render_prompt(item, kept=order[start:])
        tokens = count(text)
        if tokens <= budget or start == len(order):
            break
        start += 1
    if tokens > budget:
        raise ValueError(f"the question of {item.question_id} alone needs {tokens} tokens, over the {budget} available")
    return text, tokens, order[start:]
