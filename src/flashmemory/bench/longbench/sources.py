"""Evaluation text of the local LongBench-v2 task: the sources of the evaluation modules of the standard library.

The evaluation modules are those of :data:`flashmemory.bench.corpus.STDLIB_MODULES` (json, email, asyncio,
argparse, ...). The dump pass (:mod:`flashmemory.dump.sources`) never reads their packages, so their code is not
training text. A docstring that a training file repeats word for word (a method documented the same way in
another module) is dropped here too, so no entry of the documents below was ever seen by the trainer.
"""

from __future__ import annotations

import ast
import functools
import inspect
import re
import sysconfig
from dataclasses import dataclass
from pathlib import Path

from ...dump.sources import _TRIPLE_QUOTED, excluded_stdlib_top_levels, stdlib_source_documents

_SKIP_DIRS = frozenset({"test", "tests", "idle_test", "__pycache__", "site-packages"})
_MIN_DOC_CHARS = 80
# Long module docstrings are cut after whole paragraphs, so that one entry never fills a short prompt.
_MAX_DOC_CHARS = 1000
# A function longer than this would fill a short prompt on its own; such functions are left out.
_MAX_UNIT_CHARS = 2500
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z(`'\"])")


@dataclass(frozen=True, slots=True)
class DocEntry:
    """The docstring of one module, class, function or method; ``name`` is dotted (``json.decoder.JSONDecoder``)."""

    name: str
    text: str


@dataclass(frozen=True, slots=True)
class CodeUnit:
    """One function or method of a source file, with what the questions about it need.

    ``path`` is relative to the stdlib folder (``json/decoder.py``), ``qualname`` is ``Class.method`` or
    ``function``, ``class_line`` the first line of the enclosing ``class`` statement (None for a function),
    ``calls`` the names it calls (``f(...)`` and ``x.f(...)`` both give ``f``), ``doc_line`` the first line of
    its docstring.
    """

    path: str
    qualname: str
    class_line: str | None
    text: str
    calls: frozenset[str]
    doc_line: str | None


def stdlib_root() -> Path:
    """Folder of the running Python's standard library."""
    return Path(sysconfig.get_paths()["stdlib"])


@functools.cache
def eval_files() -> tuple[tuple[str, str], ...]:
    """``(path relative to the stdlib, source)`` of every ``.py`` file of the evaluation modules, sorted by path."""
    root = stdlib_root()
    paths: list[Path] = []
    for top in sorted(excluded_stdlib_top_levels()):
        if (root / f"{top}.py").is_file():
            paths.append(root / f"{top}.py")
        elif (root / top).is_dir():
            paths.extend(p for p in (root / top).rglob("*.py") if not _SKIP_DIRS & set(p.relative_to(root).parts))
    out = []
    for path in sorted(paths):
        try:
            out.append((path.relative_to(root).as_posix(), path.read_text(encoding="utf-8")))
        except (OSError, UnicodeDecodeError):
            continue
    return tuple(out)


@functools.cache
def training_paragraphs() -> frozenset[str]:
    """Whitespace-normalised paragraphs of every triple-quoted string in the training sources."""
    out: set[str] = set()
    for doc in stdlib_source_documents():
        for match in _TRIPLE_QUOTED.finditer(doc.text):
            for para in inspect.cleandoc(match.group(1) or match.group(2) or "").split("\n\n"):
                out.add(" ".join(para.split()))
    return frozenset(out)


@functools.cache
def doc_entries() -> tuple[tuple[str, tuple[DocEntry, ...]], ...]:
    """Per module (dotted name), the public docstrings of its file in source order; modules without any skipped."""
    seen = training_paragraphs()
    out = []
    for path, _ in eval_files():
        module = path[: -len(".py")].replace("/", ".").removesuffix(".__init__")
        entries = []
        for name, doc in _docstrings(path, module):
            paragraphs = [" ".join(p.split()) for p in doc.split("\n\n")]
            if len(doc) >= _MIN_DOC_CHARS and not any(p in seen for p in paragraphs):
                entries.append(DocEntry(name, _first_paragraphs([p for p in paragraphs if p], _MAX_DOC_CHARS)))
        if entries:
            out.append((module, tuple(entries)))
    return tuple(out)


@functools.cache
def _parse(path: str) -> ast.Module | None:
    # Both the documents and the code units read every file's tree; parse each file once.
    try:
        return ast.parse(dict(eval_files())[path])
    except SyntaxError:
        return None


def _first_paragraphs(paragraphs: list[str], max_chars: int) -> str:
    kept, total = [], 0
    for para in paragraphs:
        if kept and total + len(para) > max_chars:
            break
        kept.append(para)
        total += len(para) + 2
    return "\n\n".join(kept)


def _docstrings(path: str, module: str) -> list[tuple[str, str]]:
    tree = _parse(path)
    if tree is None:
        return []
    found = []
    if doc := ast.get_docstring(tree):
        found.append((module, doc))
    for node in tree.body:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef) and not node.name.startswith("_"):
            if doc := ast.get_docstring(node):
                found.append((f"{module}.{node.name}", doc))
            if isinstance(node, ast.ClassDef):
                for sub in node.body:
                    is_def = isinstance(sub, ast.FunctionDef | ast.AsyncFunctionDef)
                    if is_def and not sub.name.startswith("_") and (doc := ast.get_docstring(sub)):
                        found.append((f"{module}.{node.name}.{sub.name}", doc))
    return found


@functools.cache
def code_files() -> tuple[tuple[str, tuple[CodeUnit, ...]], ...]:
    """Per source file, its functions and methods in source order; files without any are skipped."""
    out = []
    for path, source in eval_files():
        units = _code_units(path, source)
        if units:
            out.append((path, units))
    return tuple(out)


def _code_units(path: str, source: str) -> tuple[CodeUnit, ...]:
    tree = _parse(path)
    if tree is None:
        return ()
    lines = source.splitlines()
    units = []
    for node in tree.body:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            units.append(_unit(path, node, node.name, None, lines))
        elif isinstance(node, ast.ClassDef):
            class_line = lines[node.lineno - 1]
            for sub in node.body:
                if isinstance(sub, ast.FunctionDef | ast.AsyncFunctionDef):
                    units.append(_unit(path, sub, f"{node.name}.{sub.name}", class_line, lines))
    return tuple(u for u in units if len(u.text) <= _MAX_UNIT_CHARS)


def _unit(path: str, node: ast.FunctionDef | ast.AsyncFunctionDef, qualname: str, class_line, lines) -> CodeUnit:
    start = min([node.lineno, *(d.lineno for d in node.decorator_list)])
    calls = set()
    for sub in ast.walk(node):
        if isinstance(sub, ast.Call):
            if isinstance(sub.func, ast.Name):
                calls.add(sub.func.id)
            elif isinstance(sub.func, ast.Attribute):
                calls.add(sub.func.attr)
    doc = ast.get_docstring(node)
    doc_line = doc.strip().splitlines()[0].strip() if doc and doc.strip() else None
    text = "\n".join(lines[start - 1 : node.end_lineno])
    return CodeUnit(path, qualname, class_line, text, frozenset(calls), doc_line)


def sentences(text: str, *, min_chars: int = 40, max_chars: int = 240) -> list[str]:
    """Sentences of prose in ``text`` between ``min_chars`` and ``max_chars`` long, without code or tables."""
    out = []
    for para in text.split("\n\n"):
        for sentence in _SENTENCE_END.split(" ".join(para.split())):
            if min_chars <= len(sentence) <= max_chars and ">>>" not in sentence and "|" not in sentence:
                out.append(sentence)
    return out
