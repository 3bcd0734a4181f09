"""The methods a benchmark compares, by name: full attention, LSA, baselines, an oracle and peers.

| name | what decides which KV a decode step sees | device KV |
|---|---|---|
| ``full`` | everything | whole cache |
| ``lsa`` / ``lsa-zeroshot`` | Memory Indexer (shipped / zero-shot), every ``interval`` steps | LSA reserve |
| ``recent`` / ``random`` | newest / random pages, every ``interval`` steps | LSA reserve |
| ``oracle`` | pages full attention attends to next (knows the future) | LSA reserve |
| ``quest`` | per-block min/max key bound, every step and layer | whole cache + metadata |
| ``infllm`` | block representatives, every step and layer | whole cache + metadata |
| ``snapkv`` ... ``knorm`` | a ``kvpress`` press evicts the prompt's KV once | compressed cache |

Every method is held to the same budget (``LSAConfig.budget``): the reserve's bytes for LSA-like methods, the
same number of attended history tokens for per-step selectors, the same kept fraction for presses.
"""

from __future__ import annotations

import importlib.util

from .block_method import BlockSelectMethod
from .infllm import InfLLMSelector
from .kvpress_methods import PRESSES, KVPressMethod
from .method_base import Method
from .oracle import OracleChunks
from .page_methods import FullAttention, LSAMethod, RandomPages, RecentPages
from .quest import QuestSelector

METHODS: dict[str, Method] = {
    "full": FullAttention(),
    "lsa": LSAMethod("lsa", "auto"),
    "lsa-zeroshot": LSAMethod("lsa-zeroshot", "zero-shot"),
    "recent": RecentPages(),
    "random": RandomPages(),
    "oracle": OracleChunks(),
    "quest": QuestSelector(),
    "infllm": InfLLMSelector(),
    **{name: KVPressMethod(name) for name in PRESSES},
}


def get_method(name: str, *, seed: int = 0) -> Method:
    """The registered method ``name`` (``random`` seeded with ``seed``).

    Raises:
        ValueError: for an unknown name (listing the valid ones), or when the method's package is missing
            (with the command that installs it).
    """
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; valid methods: {', '.join(METHODS)}")
    method = RandomPages(seed) if name == "random" else METHODS[name]
    if method.requires and importlib.util.find_spec(method.requires) is None:
        raise ValueError(f"method {name!r} needs the {method.requires} package: {method.install_hint}")
    return method


__all__ = [
    "METHODS",
    "BlockSelectMethod",
    "FullAttention",
    "InfLLMSelector",
    "KVPressMethod",
    "LSAMethod",
    "Method",
    "OracleChunks",
    "QuestSelector",
    "RandomPages",
    "RecentPages",
    "get_method",
]
