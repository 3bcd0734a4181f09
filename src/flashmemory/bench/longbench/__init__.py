"""LongBench-v2: its published ``data.json`` (from a path you give) and a local task of the same shape.

The local task needs no download: four-option questions over long documents and code from the evaluation modules
of the standard library (text the indexer's training prompts never use).
"""

from flashmemory.bench.longbench.format import DOMAINS, LONGBENCH_TASKS, LongBenchItem, load_longbench
from flashmemory.bench.longbench.local import LOCAL_TASKS, length_bucket, local_item
from flashmemory.bench.longbench.prompt import ANSWER_PREFIX, extract_choice, render_prompt, score_choice
from flashmemory.bench.longbench.tasks import generate_longbench, score_longbench

__all__ = [
    "ANSWER_PREFIX",
    "DOMAINS",
    "LOCAL_TASKS",
    "LONGBENCH_TASKS",
    "LongBenchItem",
    "extract_choice",
    "generate_longbench",
    "length_bucket",
    "load_longbench",
    "local_item",
    "render_prompt",
    "score_choice",
    "score_longbench",
]
