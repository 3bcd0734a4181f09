"""Tokens through one cache: the prefill, turns fed one token per step, and greedy decoding.

:func:`~flashmemory.runtime.generate.generate_ids` runs one prompt through it; a
:class:`~flashmemory.runtime.session.Session` keeps it between questions, so a long context is prefilled once.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from transformers.cache_utils import DynamicCache

from ..memory.accounting import storage_bytes


def dynamic_cache_bytes(cache) -> int:
    """Device bytes of a ``transformers`` dynamic cache: the storage behind every layer's keys and values."""
    return storage_bytes(t for layer in cache.layers for t in (layer.keys, layer.values))


def stop_ids(ids: int | list[int] | None) -> list[int]:
    """End-of-text ids as a list (a tokenizer's ``eos_token_id`` may be one id, several or None)."""
    if ids is None:
        return []
    return [ids] if isinstance(ids, int) else list(ids)


def sync(device: torch.device) -> None:
    """Wait for the device's queued work, so that wall times include it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class CacheFeed:
    """A model and the cache it fills, with the attention mask and next position of every sequence.

    Args:
        model: causal LM.
        cache: the ``past_key_values`` every forward carries.
        graph: optional :class:`~flashmemory.runtime.graph_step.GraphDecodeStep` replaying greedy steps.
    """

    def __init__(self, model: nn.Module, cache, graph=None) -> None:
        self.model = model
        self.cache = cache
        self.graph = graph
        self.attention_mask: torch.Tensor | None = None
        self.next_pos: torch.Tensor | None = None
        self.dynamic_peak = 0  # device bytes of a dynamic cache, at its largest so far

    @torch.no_grad()  # a session calls these outside generate's no_grad; a kept graph grows with every token
    def prefill(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """The prompt in one forward. Returns the last position's logits. # [B, V]

        ``attention_mask`` may be longer than ``input_ids``: its first columns are a prefix the cache already holds.
        """
        positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -input_ids.shape[1] :]
        out = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=positions,
            past_key_values=self.cache,
            use_cache=True,
            logits_to_keep=1,
        )
        self.attention_mask = attention_mask
        self.next_pos = positions[:, -1:] + 1
        return out.logits[:, -1]

    @torch.no_grad()
    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """One token per sequence through the cache. Returns its logits. # [B, V] from [B, 1]"""
        mask = self.attention_mask
        self.attention_mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        out = self.model(
            input_ids=tokens,
            attention_mask=self.attention_mask,
            position_ids=self.next_pos,
            past_key_values=self.cache,
            use_cache=True,
        )
        self.next_pos = self.next_pos + 1
        self._track()
        return out.logits[:, -1]

    def feed(self, turn: torch.Tensor, logits: torch.Tensor | None) -> torch.Tensor | None:
        """A turn that arrives after the cache was filled, one token per step, whatever the model predicts.

        An LSA cache starts a new cycle before the turn's last token, so what follows is read with pages chosen
        for the turn. Returns the logits after the turn (``logits`` when it is empty). # [B, V] from [B, F]
        """
        for i in range(turn.shape[1]):
            if i == turn.shape[1] - 1 and hasattr(self.cache, "request_boundary"):
                self.cache.request_boundary()
            logits = self.step(turn[:, i : i + 1])
        return logits

    def greedy(
        self,
        logits: torch.Tensor,
        max_new_tokens: int,
        stops: torch.Tensor,
        on_token: Callable[[torch.Tensor], None] | None = None,
    ) -> list[torch.Tensor]:
        """Greedy tokens from ``logits`` on; a finished sequence keeps emitting its first stop token.

        The last token chosen is not fed through the cache (nothing reads its logits). Returns one ``[B]`` tensor
        per step.
        """
        tokens: list[torch.Tensor] = []
        done = torch.zeros(logits.shape[0], dtype=torch.bool, device=logits.device)
        for _ in range(max_new_tokens):
            tok = logits.argmax(-1)
            if tokens:
                tok = torch.where(done, tokens[-1], tok)
            tokens.append(tok)
            if on_token is not None:
                on_token(tok)
            done |= torch.isin(tok, stops)
            if bool(done.all()):
                break
            if self.graph is not None:  # the LSA cache hands attention its own mask: padding lives in the resident set
                logits = self.graph(tok[:, None], self.next_pos)
                self.next_pos = self.next_pos + 1
            else:
                logits = self.step(tok[:, None])
        return tokens

    def _track(self) -> None:
        if isinstance(self.cache, DynamicCache):
            self.dynamic_peak = max(self.dynamic_peak, dynamic_cache_bytes(self.cache))


__all__ = ["CacheFeed", "dynamic_cache_bytes", "stop_ids", "sync"]
