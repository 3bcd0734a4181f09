"""LongMemEval: its published files (from a path you give) and a local generator of the same shape.

The local generator needs no download: long timestamped chat histories covering LongMemEval's five abilities,
scored by rules (normalised match of short answers, refusal phrases for abstention) since no judge model is used.
"""

from flashmemory.bench.longmemeval.format import LONGMEMEVAL_TASKS, QUESTION_TYPES, MemItem, load_longmemeval
from flashmemory.bench.longmemeval.local import local_item
from flashmemory.bench.longmemeval.prompt import fit_history, render_prompt
from flashmemory.bench.longmemeval.scoring import is_refusal, matches, normalize, score_answer
from flashmemory.bench.longmemeval.tasks import generate_longmemeval, score_longmemeval

__all__ = [
    "LONGMEMEVAL_TASKS",
    "QUESTION_TYPES",
    "MemItem",
    "fit_history",
    "generate_longmemeval",
    "is_refusal",
    "load_longmemeval",
    "local_item",
    "matches",
    "normalize",
    "render_prompt",
    "score_answer",
    "score_longmemeval",
]
