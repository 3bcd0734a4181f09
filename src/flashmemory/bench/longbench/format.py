"""LongBench-v2's published ``data.json``: a JSON list of four-option multiple-choice items over a long context.

Each item has ``_id``, ``domain``, ``sub_domain``, ``difficulty`` (easy/hard), ``length`` (short/medium/long, by
word count), ``question``, ``choice_A`` .. ``choice_D``, ``answer`` (a letter) and ``context``. The local task of
:mod:`flashmemory.bench.longbench.local` builds items of this same shape.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..json_items import load_json_items, require_fields

# LongBench-v2's six domains, as its data spells them, and the task names used on the command line.
DOMAINS: dict[str, str] = {
    "Single-Document QA": "single_doc_qa",
    "Multi-Document QA": "multi_doc_qa",
    "Long In-context Learning": "long_icl",
    "Long-dialogue History Understanding": "long_dialogue",
    "Code Repository Understanding": "code_repo",
    "Long Structured Data Understanding": "structured_data",
}
LONGBENCH_TASKS: tuple[str, ...] = tuple(DOMAINS.values())
DIFFICULTIES = ("easy", "hard")
LENGTH_BUCKETS = ("short", "medium", "long")
LETTERS = ("A", "B", "C", "D")
_FIELDS = ("_id", "domain", "sub_domain", "difficulty", "length", "question", *(f"choice_{c}" for c in LETTERS),
           "answer", "context")  # fmt: skip


@dataclass(frozen=True, slots=True)
class LongBenchItem:
    """One LongBench-v2 item; ``choices`` are the texts of options A-D and ``answer`` the correct letter."""

    id: str
    domain: str
    sub_domain: str
    difficulty: str
    length: str
    question: str
    choices: tuple[str, str, str, str]
    answer: str
    context: str

    @property
    def task(self) -> str:
        """The command-line task name of the item's domain (``single_doc_qa``, ``code_repo``, ...)."""
        return DOMAINS[self.domain]

    def to_json(self) -> dict[str, str]:
        """The item with the published field names, as one element of ``data.json``."""
        record = {"_id": self.id, "domain": self.domain, "sub_domain": self.sub_domain,
                  "difficulty": self.difficulty, "length": self.length, "question": self.question}  # fmt: skip
        record.update({f"choice_{c}": text for c, text in zip(LETTERS, self.choices, strict=True)})
        record.update(answer=self.answer, context=self.context)
        return record


def parse_item(record: Any, where: str) -> LongBenchItem:
    """Check one published record and turn it into an item.

    Args:
        record: one element of the ``data.json`` list.
        where: how an error names the record (file and position).

    Raises:
        ValueError: naming the record and what is wrong with it.
    """
    require_fields(record, _FIELDS, where)
    bad = [f for f in _FIELDS if not isinstance(record[f], str)]
    if bad:
        raise ValueError(f"{where}: field(s) {', '.join(bad)} must be strings")
    where = f"{where} (_id {record['_id']})"
    checks = (("domain", tuple(DOMAINS)), ("difficulty", DIFFICULTIES), ("length", LENGTH_BUCKETS), ("answer", LETTERS))
    for name, valid in checks:
        if record[name] not in valid:
            raise ValueError(f"{where}: {name} {record[name]!r} is not one of {', '.join(valid)}")
    return LongBenchItem(
        id=record["_id"],
        domain=record["domain"],
        sub_domain=record["sub_domain"],
        difficulty=record["difficulty"],
        length=record["length"],
        question=record["question"],
        choices=tuple(record[f"choice_{c}"] for c in LETTERS),  # type: ignore[arg-type]
        answer=record["answer"],
        context=record["context"],
    )


def load_longbench(path: str | Path) -> list[LongBenchItem]:
    """Read LongBench-v2's ``data.json`` (a JSON list of items), in file order.

    Raises:
        FileNotFoundError: no such file.
        ValueError: not JSON, not a list, an empty list, or an item that is not of LongBench-v2's shape.
    """
    return load_json_items(path, "LongBench-v2", parse_item)
