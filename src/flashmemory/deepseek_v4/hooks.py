"""Forward hooks that connect a :class:`DeepseekV4LSACache` to the model it serves.

- on the model: before a forward, start the decode step (cycle boundary, new entry slot); after it, stand down;
- on the target layers' lightning indexers (pre): keep ``[q_residual | x]`` of the newest tokens, the Memory
  Indexer's lookahead query;
- on every CSA layer's index scorer (post): during decode, entries that are not resident score ``-inf``, so the
  native top-k chooses among the resident set only;
- on every CSA layer's lightning indexer (post): picks that still land on a non-resident slot (when ``index_topk``
  exceeds the resident count) become ``-1``, which the compressor already treats as "attend to nothing".

They act only while a forward pass carries the cache that installed them; ``remove()`` takes them off.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from .spec import native_indexer

if TYPE_CHECKING:
    from .cache import DeepseekV4LSACache


class DeepseekV4Hooks:
    """Hooks of one cache on one model."""

    def __init__(self, cache: DeepseekV4LSACache, model: nn.Module) -> None:
        self.cache = cache
        self.handles = [
            model.register_forward_pre_hook(self._before, with_kwargs=True),
            model.register_forward_hook(self._after, with_kwargs=True),
        ]
        for layer in cache.spec.csa_layers:
            indexer = native_indexer(model, layer)
            self.handles.append(indexer.scorer.register_forward_hook(self._mask_scores))
            self.handles.append(indexer.register_forward_hook(self._drop_invalid_picks))
            if layer in cache.targets:
                self.handles.append(indexer.register_forward_pre_hook(self._lookahead(layer)))

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles.clear()
        self.cache = None  # the cache holds these hooks: without this the pair is a cycle

    def _carries(self, kwargs: dict) -> bool:
        return kwargs.get("past_key_values") is self.cache

    def _before(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        if not self._carries(kwargs):
            return
        ids = kwargs.get("input_ids")
        ids = ids if ids is not None else kwargs.get("inputs_embeds")
        if ids is None and args:
            ids = args[0]
        mask = kwargs.get("attention_mask")
        if isinstance(mask, torch.Tensor) and mask.ndim == 2 and not bool(mask.bool().all()):
            raise ValueError(
                "DeepseekV4LSACache needs unpadded prompts (the compressors pool windows of cache positions, "
                "not of token positions): batch prompts of equal length"
            )
        self.cache.begin_forward(ids.shape[1], ids.shape[0])

    def _after(self, module: nn.Module, args: tuple, kwargs: dict, output) -> None:
        if self._carries(kwargs):
            self.cache.active = False

    def _decoding(self) -> bool:
        return self.cache.active and self.cache.in_decode

    def _mask_scores(self, module: nn.Module, args: tuple, scores: torch.Tensor) -> torch.Tensor | None:
        if not self._decoding():
            return None
        _, valid = self.cache.store.order_on(scores.device)  # [B, S]
        return scores.masked_fill(~valid[:, None, :], float("-inf"))

    def _drop_invalid_picks(self, module: nn.Module, args: tuple, picks: torch.Tensor) -> torch.Tensor | None:
        if not self._decoding():
            return None
        _, valid = self.cache.store.order_on(picks.device)
        ok = valid.gather(1, picks.clamp(min=0).flatten(1)).view_as(picks) & (picks >= 0)
        return torch.where(ok, picks, torch.full_like(picks, -1))

    def _lookahead(self, layer: int):
        cache = self.cache

        def hook(module: nn.Module, args: tuple) -> None:
            if cache.active:
                hidden, q_residual, position_ids = args[0], args[1], args[2]
                cache.capture_lookahead(layer, torch.cat([q_residual, hidden], -1), position_ids)

        return hook
