"""Slot layout of the device reserve and how a byte budget becomes a number of page slots."""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..config import LSAConfig


class BudgetError(ValueError):
    """The budget cannot hold the parts of the reserve that are always resident."""


@dataclass(frozen=True, slots=True)
class ReserveLayout:
    """Regions of the per-layer device reserve, in token slots: ``[sink | page slots | recent tail]``.

    Args:
        sink: slots for the first tokens of the sequence.
        num_page_slots: page slots (``K`` in shapes); each holds one page of ``page_size`` tokens.
        page_size: tokens per page.
        tail_capacity: slots for the recent tail and the tokens written during a cycle.
    """

    sink: int
    num_page_slots: int
    page_size: int
    tail_capacity: int

    @property
    def page_start(self) -> int:
        return self.sink

    @property
    def tail_start(self) -> int:
        return self.sink + self.num_page_slots * self.page_size

    @property
    def num_slots(self) -> int:
        return self.tail_start + self.tail_capacity


@dataclass(frozen=True, slots=True)
class SequenceBytes:
    """Device bytes of one sequence's KV, per token or per chunk, summed over layers.

    Args:
        per_token: K+V bytes of one token over every LSA-managed layer.
        per_chunk_key: bytes of one frozen chunk key over every target layer.
        other_layers: bytes held by layers LSA leaves alone (e.g. sliding-window layers), at their maximum.
    """

    per_token: int
    per_chunk_key: int
    other_layers: int = 0


def sliding_layers_bytes(spec, num_tokens: int, elem: int) -> int:
    """K+V bytes that a backbone's sliding-window layers (which LSA leaves alone) hold at ``num_tokens`` tokens.

    Args:
        spec: the backbone's :class:`~flashmemory.models.adapter.BackboneSpec`.
        num_tokens: tokens of the sequence; a layer holds at most its window of them.
        elem: bytes per element.
    """
    num_sliding = spec.num_layers - len(spec.full_layers)
    window = min(num_tokens, spec.sliding_window or 0)
    return 2 * num_sliding * window * spec.num_kv_heads * spec.head_dim * elem


def backbone_sequence_bytes(spec, num_targets: int, elem: int) -> SequenceBytes:
    """Per-sequence byte sizes of LSA on a backbone: its full-attention layers are the store's, ``num_targets``
    layers keep chunk keys, and the sliding-window layers hold their whole window.

    Args:
        spec: the backbone's :class:`~flashmemory.models.adapter.BackboneSpec`.
        num_targets: layers whose chunk keys the indexer scores.
        elem: bytes per element.
    """
    per_head_token = spec.num_kv_heads * spec.head_dim * elem
    return SequenceBytes(
        per_token=2 * per_head_token * len(spec.full_layers),
        per_chunk_key=per_head_token * num_targets,
        other_layers=sliding_layers_bytes(spec, spec.sliding_window or 0, elem),
    )


def full_cache_bytes(seq: SequenceBytes, num_tokens: int, other_layers_full: int) -> int:
    """Bytes a plain full cache holds for ``num_tokens`` tokens of one sequence."""
    return seq.per_token * num_tokens + other_layers_full


def reserve_bytes(layout: ReserveLayout, seq: SequenceBytes, num_chunks: int) -> int:
    """Device bytes LSA holds for one sequence: reserve slots, chunk keys and untouched layers."""
    return layout.num_slots * seq.per_token + num_chunks * seq.per_chunk_key + seq.other_layers


def plan_layout(
    cfg: LSAConfig,
    seq: SequenceBytes,
    *,
    context_len: int,
    max_len: int,
    other_layers_full: int,
) -> ReserveLayout:
    """Derive the number of page slots from the budget.

    The budget is checked against the full cache at ``context_len`` (the smaller, hence stricter, reference),
    while chunk keys are counted for ``max_len`` tokens, so the cap holds for the whole generation. The recent tail
    reserves growth for the tokens still to come, at most a cycle's ``interval``.

    Args:
        cfg: LSA settings; ``cfg.budget`` is a fraction of the full cache (<= 1) or bytes (> 1).
        seq: per-sequence byte sizes.
        context_len: prompt tokens (padding included).
        max_len: prompt plus the most tokens that will be generated.
        other_layers_full: bytes the untouched layers would hold in a full cache at ``context_len``.

    Returns:
        The reserve layout. When every page fits, it holds all pages of ``max_len`` tokens.

    Raises:
        BudgetError: when the budget cannot hold even the sink, the recent tail and the chunk keys.
    """
    page_size = cfg.page_size
    total_pages = math.ceil(max_len / page_size)
    tail = cfg.tail_capacity_for(max_len - context_len)
    base = ReserveLayout(cfg.sink, 0, page_size, tail)
    if cfg.budget is None:
        return ReserveLayout(cfg.sink, min(cfg.max_pages or 0, total_pages), page_size, tail)
    full = full_cache_bytes(seq, context_len, other_layers_full)
    budget = cfg.budget * full if cfg.budget <= 1.0 else cfg.budget
    fixed = reserve_bytes(base, seq, math.ceil(max_len / cfg.chunk_size))
    if fixed > budget:
        if fixed > full:  # no budget a fraction can name would do: the context is shorter than the fixed part
            remedy = "This context is too short for LSA with these settings: use full attention"
        elif cfg.budget <= 1.0:
            remedy = f"Raise the budget to at least {fixed / full:.3f}"
        else:
            remedy = f"Raise the budget to at least {fixed:,} bytes"
        raise BudgetError(
            f"budget {describe_budget(cfg.budget)} of a {context_len}-token context ({int(budget):,} bytes) cannot "
            f"hold the always-resident part: sink {cfg.sink} + recent tail {tail} tokens + chunk keys "
            f"= {fixed:,} bytes ({fixed / full:.3f} of the full cache). {remedy}, or lower recent/interval/sink."
        )
    num_pages = int((budget - fixed) // (page_size * seq.per_token))
    return ReserveLayout(cfg.sink, min(num_pages, total_pages), page_size, tail)


def describe_budget(budget: float) -> str:
    return f"{budget:g} (fraction)" if budget <= 1.0 else f"{int(budget):,} bytes"
