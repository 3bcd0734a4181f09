"""LongMemEval's published format: a JSON list of questions, each with its own timestamped chat history.

Fields per item: ``question_id`` (ending in ``_abs`` for an abstention question), ``question_type``,
``question``, ``answer``, ``question_date``, ``haystack_session_ids``, ``haystack_dates``,
``haystack_sessions`` (per session a list of ``{"role": "user"|"assistant", "content": ...}`` turns, evidence
turns marked ``"has_answer": true``) and ``answer_session_ids``. The local generator of
:mod:`flashmemory.bench.longmemeval.local` builds items of this same shape.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..json_items import load_json_items, require_fields

# LongMemEval's question types and the ability each one tests; any ``_abs`` question tests abstention.
QUESTION_TYPES: dict[str, str] = {
    "single-session-user": "information_extraction",
    "single-session-assistant": "information_extraction",
    "single-session-preference": "information_extraction",
    "multi-session": "multi_session",
    "knowledge-update": "knowledge_update",
    "temporal-reasoning": "temporal_reasoning",
}
LONGMEMEVAL_TASKS: tuple[str, ...] = (
    "information_extraction",
    "multi_session",
    "knowledge_update",
    "temporal_reasoning",
    "abstention",
)
ROLES = ("user", "assistant")
_FIELDS = ("question_id", "question_type", "question", "answer", "question_date", "haystack_session_ids",
           "haystack_dates", "haystack_sessions", "answer_session_ids")  # fmt: skip


@dataclass(frozen=True, slots=True)
class MemItem:
    """One LongMemEval question and its history; ``sessions`` hold ``{"role", "content", ...}`` turns."""

    question_id: str
    question_type: str
    question: str
    answer: str
    question_date: str
    session_ids: tuple[str, ...]
    dates: tuple[str, ...]
    sessions: tuple[tuple[dict[str, Any], ...], ...]
    answer_session_ids: tuple[str, ...]

    @property
    def is_abstention(self) -> bool:
        """Whether the question asks about something the history never says (LongMemEval marks it ``_abs``)."""
        return self.question_id.endswith("_abs")

    @property
    def task(self) -> str:
        """The ability the question tests: one of :data:`LONGMEMEVAL_TASKS`."""
        return "abstention" if self.is_abstention else QUESTION_TYPES[self.question_type]

    def to_json(self) -> dict[str, Any]:
        """The item with the published field names."""
        return {
            "question_id": self.question_id,
            "question_type": self.question_type,
            "question": self.question,
            "answer": self.answer,
            "question_date": self.question_date,
            "haystack_session_ids": list(self.session_ids),
            "haystack_dates": list(self.dates),
            "haystack_sessions": [list(s) for s in self.sessions],
            "answer_session_ids": list(self.answer_session_ids),
        }


def parse_item(record: Any, where: str) -> MemItem:
    """Check one published record and turn it into an item.

    Raises:
        ValueError: naming the record and what is wrong with it.
    """
    require_fields(record, _FIELDS, where)
    where = f"{where} (question_id {record['question_id']!r})"
    for name in ("question_id", "question_type", "question", "question_date"):
        if not isinstance(record[name], str):
            raise ValueError(f"{where}: {name} must be a string")
    if record["question_type"] not in QUESTION_TYPES:
        raise ValueError(f"{where}: question_type {record['question_type']!r} is not one of "
                         f"{', '.join(QUESTION_TYPES)}")  # fmt: skip
    if not isinstance(record["answer"], str | int | float) or isinstance(record["answer"], bool):
        raise ValueError(f"{where}: answer must be a string or a number")
    lists = ("haystack_session_ids", "haystack_dates", "haystack_sessions", "answer_session_ids")
    bad = [name for name in lists if not isinstance(record[name], list)]
    if bad:
        raise ValueError(f"{where}: field(s) {', '.join(bad)} must be lists")
    sizes = {len(record[name]) for name in lists[:3]}
    if len(sizes) != 1:
        raise ValueError(f"{where}: haystack_session_ids, haystack_dates and haystack_sessions differ in length")
    sessions = tuple(_parse_session(s, f"{where}: session {i}") for i, s in enumerate(record["haystack_sessions"]))
    return MemItem(
        question_id=record["question_id"],
        question_type=record["question_type"],
        question=record["question"],
        answer=str(record["answer"]),
        question_date=record["question_date"],
        session_ids=tuple(str(s) for s in record["haystack_session_ids"]),
        dates=tuple(str(d) for d in record["haystack_dates"]),
        sessions=sessions,
        answer_session_ids=tuple(str(s) for s in record["answer_session_ids"]),
    )


def _parse_session(session: Any, where: str) -> tuple[dict[str, Any], ...]:
    if not isinstance(session, list):
        raise ValueError(f"{where}: a session must be a list of turns")
    for j, turn in enumerate(session):
        ok = isinstance(turn, dict) and turn.get("role") in ROLES and isinstance(turn.get("content"), str)
        if not ok:
            raise ValueError(f"{where}, turn {j}: a turn needs a role (user or assistant) and a string content")
    return tuple(session)


def load_longmemeval(path: str | Path) -> list[MemItem]:
    """Read a LongMemEval file (``longmemeval_s.json``, ``_m`` or ``_oracle``), in file order.

    Raises:
        FileNotFoundError: no such file.
        ValueError: not JSON, not a list, an empty list, or an item not of LongMemEval's shape.
    """
    return load_json_items(path, "LongMemEval", parse_item)
