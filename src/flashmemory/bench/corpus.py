"""Filler text that is installed on every machine: the documentation strings of Python's standard library.

Evaluation suites (RULER) use Paul Graham essays, SQuAD and HotpotQA; this corpus is disjoint from them.
"""

from __future__ import annotations

import importlib
import inspect
import random
import warnings

STDLIB_MODULES = (
    "argparse", "asyncio", "collections", "contextlib", "csv", "dataclasses", "datetime", "decimal",
    "email", "enum", "fractions", "functools", "gzip", "heapq", "http.client", "inspect", "ipaddress",
    "itertools", "json", "logging", "mailbox", "pathlib", "pickle", "pprint", "queue", "random", "re",
    "shutil", "socket", "sqlite3", "statistics", "string", "subprocess", "tarfile", "tempfile",
    "textwrap", "threading", "typing", "unittest", "urllib.parse", "uuid", "zipfile",
)  # fmt: skip


def stdlib_paragraphs(modules: tuple[str, ...] = STDLIB_MODULES, min_chars: int = 200) -> list[str]:
    """Paragraphs of prose from module, class and function docstrings, in a stable order."""
    paragraphs: list[str] = []
    for name in modules:
        try:
            module = importlib.import_module(name)
        except ImportError:
            continue
        objects = [module] + [
            obj for _, obj in sorted(vars(module).items()) if inspect.isclass(obj) or inspect.isfunction(obj)
        ]
        for obj in objects:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)  # typing.re and friends warn when read
                doc = inspect.getdoc(obj) or ""
            for para in doc.split("\n\n"):
                text = " ".join(para.split())
                if len(text) >= min_chars and ">>>" not in text:
                    paragraphs.append(text)
    return list(dict.fromkeys(paragraphs))


def filler_text(tokenizer, num_tokens: int, *, seed: int, modules: tuple[str, ...] = STDLIB_MODULES) -> list[str]:
    """Shuffled paragraphs whose total length is about ``num_tokens`` tokens of ``tokenizer``."""
    paragraphs = stdlib_paragraphs(modules)
    random.Random(seed).shuffle(paragraphs)
    out, total = [], 0
    for para in paragraphs * 8:
        n = len(tokenizer(para, add_special_tokens=False)["input_ids"]) + 1
        if total + n > num_tokens:
            break
        out.append(para)
        total += n
    return out
