"""Per-step block selection over a full device cache (Quest- and InfLLM-style baselines).

:class:`BlockSelectCache` is a ``DynamicCache``: every token stays on the device. Before each decode step of a
full-attention layer a forward pre-hook computes that layer's rotated query, asks a :class:`BlockScorer` to rate
the complete blocks of the history, and hands attention a mask that keeps the sink, the ``num_blocks`` best
blocks per KV head and a recent window. These methods save attention reads, not memory: their physical device
KV is the whole cache plus the block metadata.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from transformers.cache_utils import DynamicCache

from ..memory.accounting import storage_bytes
from ..models.adapter import attention_module, backbone_spec, rotated_queries


@dataclass(slots=True)
class BlockSelectConfig:
    """How many tokens a decode step attends to.

    Args:
        block_size: tokens per selectable block.
        num_blocks: blocks attended per step and KV head, besides the sink and the recent window.
        sink: first tokens always attended.
        recent: newest tokens always attended (the window starts on a block boundary, so it may hold up
            to ``block_size - 1`` more).
    """

    block_size: int
    num_blocks: int
    sink: int = 16
    recent: int = 64

    def __post_init__(self) -> None:
        if self.block_size < 1 or self.recent < 1:
            raise ValueError(f"block_size and recent must be >= 1, got {self.block_size} and {self.recent}")
        if self.num_blocks < 0 or self.sink < 0:
            raise ValueError(f"num_blocks and sink must be >= 0, got {self.num_blocks} and {self.sink}")


class BlockScorer:
    """Per-block metadata built once per complete block, and block scores for one decode query."""

    needs_queries: bool = False

    def summarize(self, keys: torch.Tensor, queries: torch.Tensor | None) -> list[torch.Tensor]:
        """Metadata of ``n`` complete blocks.

        Args:
            keys: post-RoPE keys of the blocks. # [B, Hkv, n, b, D]
            queries: post-RoPE queries of the same tokens (only when :attr:`needs_queries`). # [B, Hq, n, b, D]

        Returns:
            Tensors with the block axis at dim 2, e.g. ``[B, Hkv, n, D]``.
        """
        raise NotImplementedError

    def score(self, query: torch.Tensor, meta: list[torch.Tensor]) -> torch.Tensor:
        """Score every summarised block for one query per sequence.

        Args:
            query: the decode token's post-RoPE query, grouped by KV head. # [B, Hkv, G, D]
            meta: the tensors of :meth:`summarize`, concatenated over blocks. # [B, Hkv, N, ...]

        Returns:
            Higher is more relevant. # [B, Hkv, N]
        """
        raise NotImplementedError


class BlockSelectCache(DynamicCache):
    """A full cache whose full-attention layers attend, at each decode step, to blocks a scorer picks.

    Args:
        model: the causal LM (hooks go on its full-attention layers; :meth:`close` removes them).
        cfg: block size and budget.
        scorer: rates blocks; one instance serves every layer (its metadata lives here, per layer).
    """

    def __init__(self, model: nn.Module, cfg: BlockSelectConfig, scorer: BlockScorer) -> None:
        super().__init__(config=model.config)
        impl = getattr(model.config, "_attn_implementation", "sdpa")
        if impl not in ("sdpa", "eager"):
            raise ValueError(f"BlockSelectCache needs attn_implementation 'sdpa' or 'eager', the model uses {impl!r}")
        self.attn_impl = impl
        self.cfg = cfg
        self.scorer = scorer
        self.spec = backbone_spec(model)
        self.scored_layers = self.spec.full_layers
        self.meta: dict[int, list[torch.Tensor]] = {}
        self.pending_queries: dict[int, torch.Tensor] = {}  # queries of tokens not yet in a summarised block
        self.num_summarized: dict[int, int] = dict.fromkeys(self.scored_layers, 0)
        self.peak_device_bytes = 0
        self.masked_steps = 0
        self.handles = [
            model.register_forward_pre_hook(self._check_padding, with_kwargs=True),
            model.register_forward_hook(self._sample_bytes, with_kwargs=True),
        ]
        for layer in self.scored_layers:
            hook = self._make_hook(layer)
            self.handles.append(attention_module(model, layer).register_forward_pre_hook(hook, with_kwargs=True))

    def close(self) -> None:
        """Remove the hooks from the model."""
        for handle in self.handles:
            handle.remove()
        self.handles.clear()

    def __enter__(self) -> BlockSelectCache:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _check_padding(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        mask = kwargs.get("attention_mask")
        if kwargs.get("past_key_values") is self and mask is not None and getattr(mask, "ndim", 0) == 2:
            if not bool(mask.all()):
                raise NotImplementedError("BlockSelectCache decodes unpadded sequences only (one prompt per batch)")

    def _sample_bytes(self, module: nn.Module, args: tuple, kwargs: dict, output) -> None:
        # After every decode forward, as the plain-cache path samples: a sliding layer may hold a view of the whole
        # prompt until its next update, in this cache and in DynamicCache alike.
        tokens = kwargs.get("input_ids", kwargs.get("inputs_embeds"))
        if kwargs.get("past_key_values") is self and tokens is not None and tokens.shape[1] == 1:
            self.peak_device_bytes = max(self.peak_device_bytes, self.device_kv_bytes())

    def _make_hook(self, layer: int):
        def hook(module: nn.Module, args: tuple, kwargs: dict):
            if kwargs.get("past_key_values") is not self:
                return None
            hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
            cos, sin = kwargs["position_embeddings"]
            decoding = hidden.shape[1] == 1 and self.layers[layer].is_initialized
            if not decoding and not self.scorer.needs_queries:
                return None
            query = rotated_queries(module, cos.shape[-1], hidden, cos[:, :, None], sin[:, :, None]).transpose(1, 2)
            if self.scorer.needs_queries:
                old = self.pending_queries.get(layer)
                self.pending_queries[layer] = query if old is None else torch.cat([old, query], dim=2)
            if not decoding:
                return None
            mask = self._decode_mask(layer, query[:, :, 0], hidden.dtype)
            if mask is None:
                return None
            kwargs["attention_mask"] = mask
            return args, kwargs

        return hook

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        keys, values = super().update(key_states, value_states, layer_idx, *args, **kwargs)
        if layer_idx in self.num_summarized:
            self._summarize(layer_idx, keys)
        return keys, values

    def _summarize(self, layer: int, keys: torch.Tensor) -> None:
        b, done = self.cfg.block_size, self.num_summarized[layer]
        complete = keys.shape[2] // b
        if complete <= done:
            return
        n = complete - done
        blocks = keys[:, :, done * b : complete * b].unflatten(2, (n, b))  # [B, Hkv, n, b, D]
        queries = None
        if self.scorer.needs_queries:
            pending = self.pending_queries[layer]
            queries = pending[:, :, : n * b].unflatten(2, (n, b))  # [B, Hq, n, b, D]
            self.pending_queries[layer] = pending[:, :, n * b :]
        new = self.scorer.summarize(blocks, queries)
        old = self.meta.get(layer)
        self.meta[layer] = new if old is None else [torch.cat([o, m], dim=2) for o, m in zip(old, new, strict=True)]
        self.num_summarized[layer] = complete

    def _decode_mask(self, layer: int, query: torch.Tensor, dtype: torch.dtype) -> torch.Tensor | None:
        """Mask of this step over the layer's past tokens plus the incoming one, None if all are kept."""
        cfg, b = self.cfg, self.cfg.block_size
        past = self.layers[layer].get_seq_length()
        total = past + 1
        tail_start = max(0, (total - cfg.recent) // b * b)
        selectable = min(tail_start // b, self.num_summarized[layer])
        if selectable <= cfg.num_blocks:
            return None
        batch, hq, head_dim = query.shape
        hkv = self.spec.num_kv_heads
        meta = [m[:, :, :selectable] for m in self.meta[layer]]
        scores = self.scorer.score(query.view(batch, hkv, hq // hkv, head_dim), meta).float()  # [B, Hkv, N]
        ends = (torch.arange(selectable, device=scores.device) + 1) * b
        scores = scores.masked_fill(ends <= cfg.sink, float("-inf"))  # blocks inside the sink are kept anyway
        top = scores.topk(cfg.num_blocks, dim=-1).indices if cfg.num_blocks else None
        keep = torch.zeros(batch, hkv, total, dtype=torch.bool, device=query.device)
        if top is not None:
            chosen = torch.zeros(batch, hkv, selectable, dtype=torch.bool, device=query.device)
            chosen.scatter_(-1, top, True)
            keep[..., : selectable * b] = chosen.repeat_interleave(b, dim=-1)
        keep[..., : cfg.sink] = True
        keep[..., selectable * b :] = True
        self.masked_steps += 1
        mask = keep.repeat_interleave(hq // hkv, dim=1)[:, :, None, :]  # [B, Hq, 1, T+1]
        if self.attn_impl == "eager":
            return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, torch.finfo(dtype).min)
        return mask

    def device_kv_bytes(self) -> int:
        """Physical device bytes: every cached key and value plus the block metadata."""
        tensors = [t for layer in self.layers if layer.is_initialized for t in (layer.keys, layer.values)]
        tensors += [t for meta in self.meta.values() for t in meta]
        return storage_bytes(tensors)

    def full_kv_bytes(self) -> int:
        """Bytes of the keys and values alone (what a plain ``DynamicCache`` holds now)."""
        return storage_bytes(t for layer in self.layers if layer.is_initialized for t in (layer.keys, layer.values))


__all__ = ["BlockScorer", "BlockSelectCache", "BlockSelectConfig"]
