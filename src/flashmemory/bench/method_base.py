"""The interface every benchmarked method implements, and the helpers they share."""

from __future__ import annotations

import torch
from torch import nn

from ..config import LSAConfig
from ..runtime.generate import generate_ids
from ..runtime.stats import GenerationStats


class Method:
    """One way of decoding a prompt; subclasses set :attr:`name` and implement :meth:`run`.

    Attributes:
        name: the registry name.
        kv_note: what the method's device KV bytes consist of (printed under the summary table).
        requires: a module the method imports when it runs, checked before a benchmark starts.
        install_hint: the command that installs ``requires``.
    """

    name: str = ""
    kv_note: str = ""
    requires: str | None = None
    install_hint: str = ""

    def run(
        self,
        model: nn.Module,
        tokenizer,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None,
        max_new_tokens: int,
        lsa: LSAConfig,
        followup: torch.Tensor | None = None,
    ) -> tuple[list[list[int]], GenerationStats]:
        """Greedy-decode the prompts.

        Args:
            model: causal LM.
            tokenizer: its tokenizer (only ``eos_token_id`` is read).
            input_ids: left-padded prompts. # [B, T]
            attention_mask: 1 for real tokens. # [B, T]
            max_new_tokens: decode steps at most.
            lsa: LSA settings; its budget is the one every compressed method is held to (ignored by ``full``).
            followup: a turn fed through the method's cache after the prefill, before decoding (see
                :func:`flashmemory.runtime.generate.generate_ids`); what the method kept from the prompt must serve
                it. # [B, F]

        Returns:
            Generated ids per prompt (cut before the first EOS) and the accounting.
        """
        raise NotImplementedError


def stop_ids(tokenizer) -> list[int]:
    """The tokenizer's EOS ids as a list (empty when it has none)."""
    eos = getattr(tokenizer, "eos_token_id", None)
    if eos is None:
        return []
    return [eos] if isinstance(eos, int) else list(eos)


def until_eos(ids: torch.Tensor, stops: list[int]) -> list[list[int]]:
    """Each row of ``ids`` ``[B, N]`` cut before its first stop id."""
    out = []
    for row in ids.cpu().tolist():
        cut = next((i for i, t in enumerate(row) if t in stops), len(row))
        out.append(row[:cut])
    return out


def require_unpadded(name: str, attention_mask: torch.Tensor | None) -> None:
    """Refuse left padding for methods that decode one unpadded prompt at a time."""
    if attention_mask is not None and not bool(attention_mask.bool().all()):
        raise ValueError(f"method {name!r} decodes unpadded prompts only; run one prompt per batch")


def decode_greedy(
    model: nn.Module,
    tokenizer,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    max_new_tokens: int,
    followup: torch.Tensor | None = None,
    cache_factory=None,
) -> tuple[list[list[int]], GenerationStats]:
    """Greedy decoding on a transformers cache (or ``cache_factory``'s), cut at the tokenizer's EOS ids."""
    stops = stop_ids(tokenizer)
    ids, stats = generate_ids(
        model,
        input_ids,
        attention_mask,
        method="full",
        max_new_tokens=max_new_tokens,
        eos_token_id=stops,
        cache_factory=cache_factory,
        followup_ids=followup,
    )
    return until_eos(ids, stops), stats


def followup_len(followup: torch.Tensor | None) -> int:
    """Tokens of a follow-up turn (0 without one)."""
    return 0 if followup is None else int(followup.shape[1])


__all__ = ["Method", "decode_greedy", "followup_len", "require_unpadded", "stop_ids", "until_eos"]
