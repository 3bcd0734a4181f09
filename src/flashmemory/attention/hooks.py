"""Forward pre-hooks that connect an :class:`LSACache` to the model it serves.

They read the lookahead hidden states at the target layers and give LSA layers the decode mask of the
reserve. They act only when the forward call carries the cache that installed them, and ``remove()`` takes
them off again: nothing is patched globally.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from torch import nn

from ..models.adapter import attention_module

if TYPE_CHECKING:
    from .cache import LSACache


class CacheHooks:
    """Hooks of one cache on one model."""

    def __init__(self, cache: LSACache, model: nn.Module) -> None:
        self.cache = cache
        self.handles = [model.register_forward_pre_hook(self._on_model, with_kwargs=True)]
        for layer in sorted(set(cache.targets) | set(cache.lsa_layers)):
            hook = self._make_attention_hook(layer)
            self.handles.append(attention_module(model, layer).register_forward_pre_hook(hook, with_kwargs=True))

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles.clear()
        self.cache = None  # the cache holds these hooks: without this the pair is a cycle

    def _on_model(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        cache = self.cache
        if kwargs.get("past_key_values") is not cache or cache.store is not None:
            return
        mask = kwargs.get("attention_mask")
        if mask is not None and getattr(mask, "ndim", 0) == 2:
            cache.set_padding(mask)

    def _make_attention_hook(self, layer: int):
        cache = self.cache
        is_target = layer in cache.targets
        is_lsa = layer in cache.lsa_layers
        is_first = layer == cache.first_lsa_layer

        def hook(module: nn.Module, args: tuple, kwargs: dict):
            if kwargs.get("past_key_values") is not cache:
                return None
            hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
            decoding = hidden.shape[1] == 1 and cache.store is not None
            if decoding and is_first:
                cache.begin_decode_step()
            if is_target:
                cache.capture_lookahead(layer, hidden, kwargs.get("position_ids"))
            if is_lsa and cache.feedback is not None:
                rows = 1 if decoding else min(cache.feedback.spec.window, hidden.shape[1])
                cache.feedback.capture_query(layer, hidden, kwargs["position_embeddings"], rows)
            if decoding and is_lsa:
                kwargs["attention_mask"] = cache.decode_mask(hidden.dtype)
                return args, kwargs
            return None

        return hook
