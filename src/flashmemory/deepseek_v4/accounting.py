"""Device KV bytes of DeepSeek-V4, full cache vs LSA, from shapes alone (and the tensors to check them against).

What a decoding sequence keeps on the device, per component:

- ``csa_entries``: CSA attention entries (one per ``csa_rate`` tokens, ``head_dim`` wide, keys = values);
- ``csa_indexer_keys``: the lightning indexer's keys of those entries (``index_head_dim`` wide);
- ``memory_indexer_keys``: LSA only, the frozen indexer keys of the target layers the Memory Indexer scores;
- ``hca_entries``: HCA entries (one per ``hca_rate`` tokens), kept whole by LSA too;
- ``sliding_window``: the raw window of every layer (transformers keeps separate key and value tensors on
  sliding-only layers, one shared tensor on CSA/HCA layers);
- ``compressor_state``: tokens waiting for their window to close and the overlap carried between windows, an
  upper bound (the exact size depends on where the sequence stands in its window).

With LSA the CSA entries and their indexer keys live in the host mirror; the device keeps the reserve slots
(sink, resident pages, recent tail) of both.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace

import torch

from ..config import LSAConfig
from ..memory.layout import BudgetError, ReserveLayout, SequenceBytes, describe_budget, plan_layout
from .spec import SLIDING, DeepseekV4Spec


@dataclass(frozen=True, slots=True)
class KVBytes:
    """Device bytes per component (see the module docstring), for a whole batch."""

    csa_entries: int
    csa_indexer_keys: int
    memory_indexer_keys: int
    hca_entries: int
    sliding_window: int
    compressor_state: int

    @property
    def total(self) -> int:
        return sum(asdict(self).values())

    def to_dict(self) -> dict[str, int]:
        return {**asdict(self), "total": self.total}


def entry_config(lsa: LSAConfig, rate: int) -> LSAConfig:
    """``lsa`` restated in CSA entries: the store and the page planner count entries, not tokens.

    ``lsa.chunk_size`` must be the CSA rate (a chunk is one compressed entry); ``interval``, ``recent`` and
    ``sink`` are in tokens and must be multiples of it.
    """
    if lsa.chunk_size != rate:
        raise ValueError(f"LSAConfig.chunk_size must be the CSA rate ({rate} tokens per entry), got {lsa.chunk_size}")
    for name in ("interval", "recent", "sink"):
        if getattr(lsa, name) % rate:
            raise ValueError(f"LSAConfig.{name} ({getattr(lsa, name)}) must be a multiple of the CSA rate ({rate})")
    return replace(
        lsa,
        chunk_size=1,
        interval=lsa.interval // rate,
        recent=lsa.recent // rate,
        sink=lsa.sink // rate,
        query_window=lsa.query_window,
    )


def sliding_bytes(spec: DeepseekV4Spec, num_tokens: int, elem: int, *, compact: bool = False) -> int:
    """Raw windows of all layers. transformers' layers keep ``window`` tokens of storage (the last window is a
    view of the previous step's concatenation); the LSA cache copies the ``window - 1`` it needs."""
    window = min(num_tokens, spec.sliding_window - 1 if compact else spec.sliding_window)
    copies = sum(2 if t == SLIDING else 1 for t in spec.layer_types)
    return copies * window * spec.head_dim * elem


def state_bytes(spec: DeepseekV4Spec, elem: int) -> int:
    """Upper bound of the compressors' pending windows and overlap state of all layers (one sequence)."""
    csa = 2 * spec.csa_rate * (2 * spec.head_dim + 2 * spec.index_head_dim)  # buffered kv + gate, two series
    csa += 2 * spec.csa_rate * (spec.head_dim + spec.index_head_dim)  # overlap kv + gate
    hca = 2 * spec.hca_rate * spec.head_dim
    return (len(spec.csa_layers) * csa + len(spec.hca_layers) * hca) * elem


def hca_bytes(spec: DeepseekV4Spec, num_tokens: int, elem: int) -> int:
    return len(spec.hca_layers) * (num_tokens // spec.hca_rate) * spec.head_dim * elem


def other_bytes(spec: DeepseekV4Spec, num_tokens: int, elem: int, *, compact: bool = False) -> int:
    """Bytes LSA leaves alone for one sequence: sliding windows, HCA entries, compressor state."""
    window = sliding_bytes(spec, num_tokens, elem, compact=compact)
    return window + hca_bytes(spec, num_tokens, elem) + state_bytes(spec, elem)


def full_cache_bytes(spec: DeepseekV4Spec, num_tokens: int, *, elem: int = 2, batch: int = 1) -> KVBytes:
    """What transformers' own cache holds on the device for ``num_tokens`` tokens of ``batch`` sequences."""
    entries = len(spec.csa_layers) * (num_tokens // spec.csa_rate)
    return KVBytes(
        csa_entries=batch * entries * spec.head_dim * elem,
        csa_indexer_keys=batch * entries * spec.index_head_dim * elem,
        memory_indexer_keys=0,
        hca_entries=batch * hca_bytes(spec, num_tokens, elem),
        sliding_window=batch * sliding_bytes(spec, num_tokens, elem),
        compressor_state=batch * state_bytes(spec, elem),
    )


def sequence_bytes(spec: DeepseekV4Spec, num_targets: int, num_tokens: int, elem: int) -> SequenceBytes:
    """Per-entry sizes for the generic page planner (one sequence, ``num_tokens`` at most)."""
    return SequenceBytes(
        per_token=len(spec.csa_layers) * (spec.head_dim + spec.index_head_dim) * elem,
        per_chunk_key=num_targets * spec.index_head_dim * elem,
        other_layers=other_bytes(spec, num_tokens, elem, compact=True),
    )


def plan_reserve(
    spec: DeepseekV4Spec, lsa: LSAConfig, *, num_targets: int, context_tokens: int, max_new_tokens: int, elem: int
) -> ReserveLayout:
    """Page slots the budget allows, in CSA entries (see :func:`flashmemory.memory.layout.plan_layout`)."""
    max_tokens = context_tokens + max_new_tokens
    cfg = entry_config(lsa, spec.csa_rate)
    seq = sequence_bytes(spec, num_targets, max_tokens, elem)
    try:
        return plan_layout(
            cfg,
            seq,
            context_len=context_tokens // spec.csa_rate,
            max_len=max(1, max_tokens // spec.csa_rate),
            other_layers_full=other_bytes(spec, context_tokens, elem),
        )
    except BudgetError:
        tail = cfg.tail_capacity_for(max(1, max_tokens // spec.csa_rate) - context_tokens // spec.csa_rate)
        base = ReserveLayout(cfg.sink, 0, cfg.page_size, tail)
        fixed = lsa_cache_bytes(spec, base, max_tokens, num_targets=num_targets, elem=elem).total
        full = full_cache_bytes(spec, context_tokens, elem=elem).total
        raise BudgetError(
            f"budget {describe_budget(lsa.budget)} of a {context_tokens}-token context cannot hold what DeepSeek-V4 "
            f"always keeps on the device: sink {lsa.sink} + recent tail {tail * spec.csa_rate} tokens "
            f"of CSA entries, Memory-Indexer keys, sliding windows, HCA entries = {fixed:,} bytes "
            f"({fixed / full:.3f} of the full cache). Raise the budget to at least {fixed / full:.3f}, use "
            "max_pages, or lower recent/interval/sink."
        ) from None


def lsa_cache_bytes(
    spec: DeepseekV4Spec,
    layout: ReserveLayout,
    num_tokens: int,
    *,
    num_targets: int,
    elem: int = 2,
    batch: int = 1,
) -> KVBytes:
    """Device bytes of the LSA cache at ``num_tokens`` tokens (memory-indexer keys of every entry so far)."""
    slots = len(spec.csa_layers) * layout.num_slots
    return KVBytes(
        csa_entries=batch * slots * spec.head_dim * elem,
        csa_indexer_keys=batch * slots * spec.index_head_dim * elem,
        memory_indexer_keys=batch * num_targets * (num_tokens // spec.csa_rate) * spec.index_head_dim * elem,
        hca_entries=batch * hca_bytes(spec, num_tokens, elem),
        sliding_window=batch * sliding_bytes(spec, num_tokens, elem, compact=True),
        compressor_state=batch * state_bytes(spec, elem),
    )


def layer_state_tensors(layer) -> dict[str, list[torch.Tensor]]:
    """The device tensors of one V4 cache layer (stock or LSA), grouped by component."""
    window = [t for t in (layer.keys, layer.values) if t is not None]
    out = {"sliding_window": window, "csa_entries": [], "csa_indexer_keys": [], "hca_entries": [], "state": []}
    compressed = getattr(layer, "compressed_kv", None)
    if compressed is None:
        return out
    is_csa = "indexer" in compressed  # only CSA layers have a lightning indexer
    if compressed.get("compressor") is not None:
        out["csa_entries" if is_csa else "hca_entries"].append(compressed["compressor"])
    if compressed.get("indexer") is not None:
        out["csa_indexer_keys"].append(compressed["indexer"])
    overlap = (getattr(layer, "overlap_kv", {}), getattr(layer, "overlap_gate", {}))
    for states in (layer.buffer_kv, layer.buffer_gate, *overlap):
        out["state"] += [t for t in states.values() if t is not None]
    return out


def per_sequence_ratio(lsa: KVBytes, full: KVBytes) -> float:
    return lsa.total / full.total if full.total else math.nan
