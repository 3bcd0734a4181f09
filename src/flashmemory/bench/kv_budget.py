"""Byte sizes shared by the benchmark's methods: the full cache, and the tokens LSA's budget buys.

Peers are compared with LSA at the same budget. A method that selects tokens (Quest-, InfLLM-style) attends to
as many history tokens as LSA's page slots hold; a method that evicts tokens (kvpress) keeps the budget's
fraction of the prompt. These helpers derive both from the model's shapes exactly as :class:`LSACache` plans
its reserve, so the budgets agree by construction.
"""

from __future__ import annotations

from torch import nn

from ..config import LSAConfig
from ..indexer.shipped import shipped_target_layers
from ..memory.layout import (
    BudgetError,
    SequenceBytes,
    backbone_sequence_bytes,
    full_cache_bytes,
    plan_layout,
    sliding_layers_bytes,
)
from ..models.adapter import backbone_spec


def sequence_bytes(model: nn.Module, lsa: LSAConfig, elem: int) -> SequenceBytes:
    """Per-sequence byte sizes of the ``lsa`` method on ``model`` (as ``LSACache.sequence_bytes``).

    Its chunk keys are those of the indexer ``lsa`` uses: a shipped checkpoint's layers when one matches the
    model, else the zero-shot default; so peers match ``lsa``'s reserve (``lsa-zeroshot``'s may differ by a page).
    """
    spec = backbone_spec(model)
    # the layers `lsa` keys: a shipped checkpoint reads its own, which may differ from the zero-shot default
    targets = lsa.target_layers or shipped_target_layers(model) or spec.default_target_layers()
    return backbone_sequence_bytes(spec, len(targets), elem)


def full_kv_bytes(model: nn.Module, batch: int, num_tokens: int, elem: int) -> int:
    """Bytes a plain full cache holds for ``batch`` sequences of ``num_tokens`` tokens.

    Sliding-window layers hold at most their window.
    """
    spec = backbone_spec(model)
    seq = backbone_sequence_bytes(spec, 0, elem)
    return batch * full_cache_bytes(seq, num_tokens, sliding_layers_bytes(spec, num_tokens, elem))


def lsa_page_tokens(model: nn.Module, lsa: LSAConfig, context_len: int, max_new_tokens: int, elem: int) -> int:
    """History tokens LSA's page slots hold at this budget (besides sink and recent tail).

    Args:
        model: the backbone.
        lsa: LSA settings (budget, page size, sink, recent).
        context_len: prompt tokens.
        max_new_tokens: most decode steps.
        elem: bytes per element of the cache.

    Raises:
        BudgetError: when the budget cannot hold LSA's always-resident part (the same refusal as LSA's).
    """
    spec = backbone_spec(model)
    lsa = lsa.with_page_chunks(spec.default_page_chunks())
    layout = plan_layout(
        lsa,
        sequence_bytes(model, lsa, elem),
        context_len=context_len,
        max_len=context_len + max_new_tokens,
        other_layers_full=sliding_layers_bytes(spec, context_len, elem),
    )
    return layout.num_page_slots * layout.page_size


def kept_fraction(model: nn.Module, lsa: LSAConfig, context_len: int, elem: int, turn_len: int = 0) -> float:
    """The fraction of the prompt's KV a budget keeps: the budget itself, or bytes over the full prompt cache.

    With ``turn_len`` tokens of a later turn that will join the cache uncompressed, the prompt keeps less, so that
    prompt and turn together hold the budget's share of both.

    Raises:
        BudgetError: when the budget cannot even hold the turn.
    """
    if lsa.budget is None:
        raise ValueError("peers need LSAConfig.budget (a fraction or bytes), not max_pages")
    total = context_len + turn_len
    share = float(lsa.budget) if lsa.budget <= 1.0 else min(1.0, lsa.budget / full_kv_bytes(model, 1, total, elem))
    kept = (share * total - turn_len) / context_len
    if kept <= 0:
        raise BudgetError(
            f"budget {lsa.budget} holds {share * total:.0f} tokens, fewer than the {turn_len} of the follow-up turn"
        )
    return min(1.0, kept)


__all__ = ["full_kv_bytes", "kept_fraction", "lsa_page_tokens", "sequence_bytes"]
