"""A local task of LongBench-v2's shape, built from the evaluation modules of the standard library.

Three of LongBench-v2's domains, four options per question, half the questions easy and half hard:

* ``single_doc_qa``: one long reference document (the docstrings of several modules, entry by entry).
  Easy: which entry contains a quoted sentence. Hard: of four sentences, which one is not from a given entry.
* ``multi_doc_qa``: many short documents (a few entries of one module each), numbered in random order.
  Easy: which document contains a quoted passage. Hard: which two documents contain two passages, in order.
* ``code_repo``: excerpts of several source files, each under a ``### File:`` header.
  Easy: in which file a function is defined, or which function has a quoted docstring line.
  Hard: which function calls a given name, or which of four functions comes first in the repository.

Every item is a function of its seed string and its size (the number of entries or functions in the context),
so the runner can grow the context until it fills a token budget. Distractors are always real names, sentences
or documents of the same context.
"""

from __future__ import annotations

import random
import re
from collections import Counter
from collections.abc import Callable, Sequence
from typing import TypeVar

from .format import LETTERS, LongBenchItem
from .sources import CodeUnit, DocEntry, code_files, doc_entries, sentences

LOCAL_TASKS: tuple[str, ...] = ("single_doc_qa", "multi_doc_qa", "code_repo")
_DOMAIN = {"single_doc_qa": "Single-Document QA", "multi_doc_qa": "Multi-Document QA",
           "code_repo": "Code Repository Understanding"}  # fmt: skip
_SUB_DOMAIN = {"single_doc_qa": "Library reference", "multi_doc_qa": "Library reference", "code_repo": "Code repo QA"}
# LongBench-v2 cuts its lengths at 32K and 128K words; the local task uses the same cuts scaled down by 8, in
# tokens, so that the lengths a single GPU runs (4K-32K) spread over all three buckets.
LENGTH_CUTS: tuple[tuple[int, str], ...] = ((4096, "short"), (16384, "medium"))


class ContextTooSmall(ValueError):
    """The context at this size holds too few entries, documents or functions for a question of this kind."""


def length_bucket(length: int) -> str:
    """``short`` up to 4K tokens, ``medium`` up to 16K, ``long`` above."""
    return next((name for cut, name in LENGTH_CUTS if length <= cut), "long")


def max_size(task: str) -> int:
    """Most entries (documents) or functions a context of ``task`` can hold: every one the sources have."""
    if task == "code_repo":
        return sum(len(units) for _, units in code_files())
    return sum(len(entries) for _, entries in doc_entries())


def local_item(task: str, key: str, size: int, difficulty: str, length_label: str) -> LongBenchItem:
    """One item of ``task`` whose context holds ``size`` entries (documents) or functions (code).

    Args:
        task: one of :data:`LOCAL_TASKS`.
        key: seed string; every random choice is drawn from ``random.Random(key)``.
        size: number of documentation entries or functions in the context.
        difficulty: ``easy`` or ``hard``: the kind of question.
        length_label: the item's ``length`` bucket.

    Raises:
        ContextTooSmall: when no question of this difficulty can be asked about so small a context.
    """
    rng = random.Random(key)
    build = {"single_doc_qa": _single_doc, "multi_doc_qa": _multi_doc, "code_repo": _code_repo}[task]
    context, (question, correct, distractors) = build(rng, size, difficulty)
    options = [correct, *distractors]
    rng.shuffle(options)
    return LongBenchItem(
        id=f"{key}/{size}",
        domain=_DOMAIN[task],
        sub_domain=_SUB_DOMAIN[task],
        difficulty=difficulty,
        length=length_label,
        question=question,
        choices=tuple(options),  # type: ignore[arg-type]
        answer=LETTERS[options.index(correct)],
        context=context,
    )


Question = tuple[str, str, list[str]]  # question, correct option, three distractors
Unit = TypeVar("Unit")


def _pick(rng: random.Random, builders: Sequence[Callable[[], Question | None]]) -> Question:
    # Try the kinds of one difficulty in a random order; the first that this context allows is asked.
    for build in rng.sample(list(builders), len(builders)):
        question = build()
        if question is not None:
            return question
    raise ContextTooSmall("context too small for a question")


def _random_runs(
    rng: random.Random, groups: Sequence[tuple[str, Sequence[Unit]]], size: int, shortest: int, longest: int
) -> list[list[Unit]]:
    """Runs of ``shortest``-``longest`` consecutive units from the groups in random order, ``size`` units in all.

    A group (a module's entries, a file's functions) gives at most one run, shorter when the group is.
    """
    order = list(groups)
    rng.shuffle(order)
    runs: list[list[Unit]] = []
    left = size
    for _, units in order:
        if left <= 0:
            break
        run = min(left, rng.randint(shortest, longest), len(units))
        start = rng.randrange(len(units) - run + 1)
        runs.append(list(units[start : start + run]))
        left -= run
    return runs


# ------------------------------------------------------------------------------------------------ documents


def _entry_stream(rng: random.Random) -> list[tuple[str, DocEntry]]:
    modules = list(doc_entries())
    rng.shuffle(modules)
    return [(module, entry) for module, entries in modules for entry in entries]


def _unique_sentences(entries: Sequence[DocEntry], context: str) -> dict[str, list[str]]:
    """Per entry name, its sentences that occur exactly once in the whole context."""
    return {e.name: [s for s in sentences(e.text) if context.count(s) == 1] for e in entries}


def _single_doc(rng: random.Random, size: int, difficulty: str) -> tuple[str, Question]:
    stream = _entry_stream(rng)[:size]
    parts, current = [], None
    for module, entry in stream:
        if module != current:
            parts.append(f"# Module {module}")
            current = module
        parts.append(f"## {entry.name}\n\n{entry.text}")
    context = "\n\n".join(parts)
    entries = [e for _, e in stream]
    unique = _unique_sentences(entries, context)
    names = [e.name for e in entries]

    def which_entry() -> Question | None:
        pairs = [(name, s) for name, ss in unique.items() for s in ss]
        if len(set(names)) < 4 or not pairs:
            return None
        name, sentence = rng.choice(pairs)
        others = rng.sample([n for n in dict.fromkeys(names) if n != name], 3)
        return f'Which entry of the document contains this sentence: "{sentence}"', name, others

    def odd_one_out() -> Question | None:
        owners = [n for n, ss in unique.items() if len(ss) >= 3]
        if not owners:
            return None
        name = rng.choice(owners)
        strangers = [s for n, ss in unique.items() if n != name for s in ss]
        if not strangers:
            return None
        question = (f"Three of the following sentences come from the entry for {name}, and one comes from another "
                    f"entry of the document. Which sentence comes from another entry?")  # fmt: skip
        return question, rng.choice(strangers), rng.sample(unique[name], 3)

    return context, _pick(rng, [which_entry] if difficulty == "easy" else [odd_one_out])


def _multi_doc(rng: random.Random, size: int, difficulty: str) -> tuple[str, Question]:
    docs = _random_runs(rng, doc_entries(), size, shortest=1, longest=4)
    labels = [f"Document {i + 1}" for i in range(len(docs))]
    context = "\n\n".join(
        f"{label}:\n\n" + "\n\n".join(f"## {e.name}\n\n{e.text}" for e in doc)
        for label, doc in zip(labels, docs, strict=True)
    )
    unique = [[s for e in doc for s in _unique_sentences([e], context)[e.name]] for doc in docs]
    with_text = [i for i, ss in enumerate(unique) if ss]

    def which_document() -> Question | None:
        if len(docs) < 4 or not with_text:
            return None
        i = rng.choice(with_text)
        others = rng.sample([lab for j, lab in enumerate(labels) if j != i], 3)
        return f'Which document contains this passage: "{rng.choice(unique[i])}"', labels[i], others

    def two_documents() -> Question | None:
        if len(docs) < 3 or len(with_text) < 2:
            return None
        a, b = rng.sample(with_text, 2)
        c = rng.choice([j for j in range(len(docs)) if j not in (a, b)])
        question = (f'Passage 1: "{rng.choice(unique[a])}"\nPassage 2: "{rng.choice(unique[b])}"\n'
                    "Which documents contain passage 1 and passage 2, respectively?")  # fmt: skip
        pair = "{} and {}".format
        distractors = [pair(labels[b], labels[a]), pair(labels[a], labels[c]), pair(labels[c], labels[b])]
        return question, pair(labels[a], labels[b]), distractors

    return context, _pick(rng, [which_document] if difficulty == "easy" else [two_documents])


# ----------------------------------------------------------------------------------------------------- code


def _render_file(units: Sequence[CodeUnit]) -> str:
    parts, current = [f"### File: {units[0].path}"], None
    for unit in units:
        if unit.class_line is not None and unit.class_line != current:
            parts.append(unit.class_line)
        current = unit.class_line
        parts.append(unit.text)
    return "\n\n".join(parts)


def _code_repo(rng: random.Random, size: int, difficulty: str) -> tuple[str, Question]:
    runs = _random_runs(rng, code_files(), size, shortest=2, longest=8)  # excerpts of files, in random order
    context = "\n\n".join(_render_file(run) for run in runs)
    units = [u for run in runs for u in run]
    counts = Counter(u.qualname for u in units)
    named = [u for u in units if counts[u.qualname] == 1]  # a name that picks out one function
    paths = list(dict.fromkeys(u.path for u in units))

    def locate() -> Question | None:
        if len(paths) < 4 or not named:
            return None
        unit = rng.choice(named)
        others = rng.sample([p for p in paths if p != unit.path], 3)
        return f"In which file of the repository is {unit.qualname} defined?", unit.path, others

    def docstring() -> Question | None:
        lines = Counter(u.doc_line for u in units)
        candidates = [u for u in named if u.doc_line and len(u.doc_line) >= 20 and lines[u.doc_line] == 1]
        if len(named) < 4 or not candidates:
            return None
        unit = rng.choice(candidates)
        others = rng.sample([u.qualname for u in named if u is not unit], 3)
        return f'Which function or method has a docstring that begins "{unit.doc_line}"?', unit.qualname, others

    def caller() -> Question | None:
        callers = Counter(name for u in units for name in u.calls)
        options = []
        for unit in named:
            for name in sorted(unit.calls):
                if callers[name] == 1 and len(name) >= 4 and name != unit.qualname.split(".")[-1]:
                    options.append((unit, name))
        rng.shuffle(options)
        for unit, name in options:
            word = re.compile(rf"\b{re.escape(name)}\b")
            innocent = [u.qualname for u in named if u is not unit and not word.search(u.text)]
            if len(innocent) >= 3:
                question = f"Which of these functions or methods calls {name}(...) directly?"
                return question, unit.qualname, rng.sample(innocent, 3)
        return None

    def first() -> Question | None:
        if len(named) < 4:
            return None
        picked = rng.sample(named, 4)
        earliest = min(picked, key=units.index)
        question = "Which of these functions or methods appears first in the repository above?"
        return question, earliest.qualname, [u.qualname for u in picked if u is not earliest]

    return context, _pick(rng, [locate, docstring] if difficulty == "easy" else [caller, first])
