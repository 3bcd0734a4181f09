"""`transformers` Cache integration: full-attention layers keep their history in a :class:`KVStore`.

This is the one module that knows the transformers Cache API (tested on 5.17 and 5.23).
"""

from __future__ import annotations

import weakref

import torch
from torch import nn
from transformers.cache_utils import Cache, CacheLayerMixin, DynamicSlidingWindowLayer

from ..config import LSAConfig
from ..indexer.chunk_keys import ChunkKeys
from ..indexer.feedback import logit_of
from ..indexer.memory_indexer import MemoryIndexer, zero_shot_indexer
from ..memory.layout import (
    SequenceBytes,
    backbone_sequence_bytes,
    full_cache_bytes,
    plan_layout,
    sliding_layers_bytes,
)
from ..memory.store import KVStore
from ..models.adapter import backbone_spec
from .cycle import CycleStats, LSACycle
from .feedback import AttentionFeedback
from .hooks import CacheHooks
from .prefix import PrefixKV

__all__ = ["CompactSlidingLayer", "CycleStats", "LSACache", "LSALayer"]


class LSALayer(CacheLayerMixin):
    """One full-attention layer whose history lives in the owner's :class:`KVStore`."""

    is_sliding = False
    is_compileable = False
    is_croppable = False

    def __init__(self, owner: LSACache, layer_idx: int) -> None:
        super().__init__()
        # a proxy: owner -> layers -> owner would be a cycle that only the collector frees, holding a finished
        # request's device and page-locked memory until it runs (a full collection cost 0.2-0.3 s per request)
        self.owner = weakref.proxy(owner)
        self.layer_idx = layer_idx
        self.num_seen = 0

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        self.is_initialized = True

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        keys, values = self.owner.layer_update(self.layer_idx, key_states, value_states)
        self.num_seen += key_states.shape[-2]
        # Point at the reserve, never at the prompt's keys: holding those would keep the full KV alive.
        store = self.owner.store
        self.keys, self.values = store.reserve_k[self.layer_idx], store.reserve_v[self.layer_idx]
        return keys, values

    def get_seq_length(self) -> int:
        return self.num_seen

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        if self.owner.in_decode:
            return self.owner.store.layout.num_slots, 0
        return self.num_seen + query_length, 0

    def get_max_length(self) -> int:
        return -1

    def offload(self) -> None:
        raise NotImplementedError("LSA keeps its own host mirror; transformers offloading does not apply")

    def prefetch(self) -> None:
        raise NotImplementedError("LSA keeps its own host mirror; transformers offloading does not apply")

    def reset(self) -> None:
        raise NotImplementedError("an LSACache serves one request; build a new one instead of resetting")

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("LSACache cannot crop (no assisted or speculative decoding)")

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        raise NotImplementedError("LSACache does not support beam search")

    def batch_repeat_interleave(self, repeats: int) -> None:
        raise NotImplementedError("LSACache does not support expanding the batch after prefill")

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        raise NotImplementedError("LSACache does not support selecting batch rows after prefill")


class CompactSlidingLayer(DynamicSlidingWindowLayer):
    """A sliding-window layer that does not keep the prompt's storage alive through a view of its tail."""

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs
    ) -> tuple[torch.Tensor, torch.Tensor]:
        keys, values = super().update(key_states, value_states, *args, **kwargs)
        if self.keys.untyped_storage().nbytes() > self.keys.numel() * self.keys.element_size():
            self.keys, self.values = self.keys.clone(), self.values.clone()
        return keys, values


class LSACache(LSACycle, Cache):
    """A transformers ``Cache`` that runs Lookahead Sparse Attention on every full-attention layer.

    Use it with ``model.generate(..., past_key_values=cache)`` or with :func:`flashmemory.generate`. It installs
    forward pre-hooks on the model (to read the lookahead hidden states and hand the decode mask to attention);
    :meth:`close` or leaving a ``with`` block removes them.

    Args:
        model: the causal LM the cache will be used with.
        lsa: LSA settings.
        indexer: a Memory Indexer for this backbone; ``None`` builds the zero-shot one from ``q_proj``.
        max_new_tokens: most tokens that will be generated (sizes the host mirror, the chunk-key budget and the
            recent tail's room for a cycle's tokens; decoding past it can fill the tail, which stops with an error).
        forced_pages: callable ``(cache) -> [B, K] page ids`` replacing the indexer (tests, oracle baselines).
        prefix: keys and values of the prompt's first tokens, computed before (:class:`PrefixKV`): the prefill
            forward then carries only the rest of the prompt, and the cache takes the whole prompt as if one
            forward had made it.
    """

    store_class = KVStore
    counts_feedback = True  # caches whose decode steps may skip the hooks (graph replay) say False

    def __init__(
        self,
        model: nn.Module,
        lsa: LSAConfig | None = None,
        indexer: MemoryIndexer | None = None,
        *,
        max_new_tokens: int = 256,
        forced_pages=None,
        prefix: PrefixKV | None = None,
    ) -> None:
        self.spec = backbone_spec(model)
        self.lsa = self.spec.resolve_counts(lsa or LSAConfig())
        impl = getattr(model.config, "_attn_implementation", "sdpa")
        if impl not in ("sdpa", "eager"):
            raise ValueError(f"LSACache needs attn_implementation 'sdpa' or 'eager', the model uses {impl!r}")
        self.attn_impl = impl
        if indexer is None:
            indexer = zero_shot_indexer(model, self.lsa)
        # a checkpoint scores with the reduction it was trained with unless the config names one
        reduce = self.lsa.layer_reduce or indexer.spec.layer_reduce
        targets, self.layer_reduce = self.spec.scorer(self.lsa.target_layers, reduce, zero_shot=False)
        if self.lsa.target_layers is not None and tuple(indexer.target_layers) != tuple(targets):
            raise ValueError(f"indexer reads layers {indexer.target_layers} but LSAConfig asks for {targets}")
        if indexer.spec.chunk_size != self.lsa.chunk_size:
            raise ValueError(
                f"indexer keys were built with chunk_size={indexer.spec.chunk_size}, "
                f"LSAConfig has {self.lsa.chunk_size}"
            )
        self.indexer = indexer
        self.targets = tuple(indexer.target_layers)
        self.lsa_layers = self.spec.full_layers
        layers: list[CacheLayerMixin] = []
        for i, kind in enumerate(self.spec.layer_types):
            if kind == "full_attention":
                layers.append(LSALayer(self, i))
            elif kind == "sliding_attention":
                layers.append(CompactSlidingLayer(sliding_window=self.spec.sliding_window))
            else:
                raise ValueError(f"layer {i} is {kind!r}: LSACache supports full and sliding attention layers")
        super().__init__(layers=layers)
        self.prefix = prefix
        if prefix is not None:
            self._start_from(prefix, next(model.parameters()))
        self.init_cycle(max_new_tokens, forced_pages)
        self.store: KVStore | None = None
        self.chunk_keys = ChunkKeys(self.targets, self.lsa.chunk_size)
        # prompt length whose token keys the first boundary scores (None: it scores chunk keys, or it has passed)
        self.token_keys_len: int | None = None
        self.later_boundary = False  # set while a boundary after the first of a turn chooses pages
        self.pad_len: torch.Tensor | None = None
        self.lookahead_valid: torch.Tensor | None = None
        self.feedback: AttentionFeedback | None = None
        self.tower_probs: torch.Tensor | None = None  # the tower's scores at the latest boundary, with a feedback head
        if self.lsa.attention_feedback is not False and indexer.feedback is not None:
            if self.counts_feedback:
                self.feedback = AttentionFeedback(model, self.lsa_layers, indexer.feedback_spec, self.lsa.chunk_size)
            elif self.lsa.attention_feedback:
                raise ValueError(f"{type(self).__name__} does not count attention feedback: use the 'mask' backend")
        self.hooks = CacheHooks(self, model)

    @property
    def first_lsa_layer(self) -> int:
        return self.lsa_layers[0]

    def layer_update(self, layer: int, keys: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Route one layer's new keys/values: whole prompt during prefill, one token per decode step."""
        if self.closed:
            raise RuntimeError("this LSACache was closed (its hooks are gone); build a new one for a new request")
        if not self.in_decode:
            if self.prefix is not None:
                before_k, before_v = self.prefix.layer(layer, keys.device, keys.dtype)
                keys, values = torch.cat([before_k, keys], -2), torch.cat([before_v, values], -2)
            if self.store is None:
                self._allocate(keys)
            elif layer == self.first_lsa_layer:
                raise NotImplementedError("LSACache takes the prompt in one forward pass (no chunked prefill)")
            self.store.write_prefill(layer, keys, values)
            if self.feedback is not None:
                self.feedback.observe_prefill(layer, keys, self.pad_len)
            if layer in self.targets:
                self.chunk_keys.extend(layer, keys, 0, self.pad_len, keys.device)
            if layer == self.first_lsa_layer and self.lsa.scores_tokens_first(
                keys.shape[-2], self.spec.default_token_keys_from()
            ):
                self.token_keys_len = keys.shape[-2]
            return keys, values
        if keys.shape[-2] != 1:
            raise NotImplementedError("LSACache decodes one token per step per sequence")
        keys, values = self.store.append(layer, keys, values)
        if self.feedback is not None:
            self.feedback.observe_decode(layer, keys, self.store.slot_pos, self.store.seq_len)
        return keys, values

    def _start_from(self, prefix: PrefixKV, param: torch.Tensor) -> None:
        """Count the prefix as seen, so that masks and positions of the prefill forward continue after it."""
        if prefix.window != [
            self.spec.sliding_window if isinstance(layer, CompactSlidingLayer) else None for layer in self.layers
        ]:
            raise ValueError("this prefix was captured from a model with other layer types")
        for i, layer in enumerate(self.layers):
            if isinstance(layer, LSALayer):
                layer.num_seen = prefix.length
            else:  # a sliding layer starts with the prefix's window, as a prefill of the whole prompt leaves it
                layer.update(*prefix.layer(i, param.device, prefix.keys[i].dtype))
                layer.cumulative_length = prefix.length

    def _allocate(self, keys: torch.Tensor) -> None:
        batch, heads, seq_len, head_dim = keys.shape
        if self.pad_len is None:
            self.pad_len = torch.zeros(batch, dtype=torch.long)
        elem = keys.element_size()
        seq = self.sequence_bytes(elem)
        max_len = seq_len + self.max_new_tokens
        layout = plan_layout(
            self.lsa,
            seq,
            context_len=seq_len,
            max_len=max_len,
            other_layers_full=self._other_bytes(seq_len, elem),
        )
        self.store = self.store_class(self.lsa_layers, layout, self.lsa.recent)
        # a context captured with room after it lends its host tensors: its tokens need not be written again
        lent = None if self.prefix is None else self.prefix.lend_mirror(self.lsa_layers, max_len, keys.dtype)
        self.store.allocate(
            batch,
            heads,
            head_dim,
            dtype=keys.dtype,
            device=keys.device,
            capacity=max_len,
            pad_len=self.pad_len,
            prefilled=lent,
        )

    def sequence_bytes(self, elem: int) -> SequenceBytes:
        """Per-sequence byte sizes for element size ``elem`` (used to plan and to report)."""
        return backbone_sequence_bytes(self.spec, len(self.targets), elem)

    def _other_bytes(self, num_tokens: int, elem: int) -> int:
        return sliding_layers_bytes(self.spec, num_tokens, elem)

    def _extend_chunk_keys(self) -> None:
        store, c = self.store, self.lsa.chunk_size
        start = self.chunk_keys.num_chunks * c
        end = store.flushed_len // c * c
        if end <= start:
            return
        for layer in self.targets:
            keys = store.mirror_k[layer][:, :, start:end]
            self.chunk_keys.extend(layer, keys, start, self.pad_len, store.device)

    def _score_chunks(self) -> torch.Tensor:
        n = self.token_keys_len
        if n is None and self.later_boundary and self.lsa.later_boundary_keys == "token":
            # every complete chunk: the cycle's end has flushed their tokens to the mirror
            n = self.chunk_keys.num_chunks * self.lsa.chunk_size
        # The prompt's token keys are read from the host mirror (the prefill wrote them there, stream-ordered
        # before this read), block by block in the scorer: holding them on the device from the prefill to here
        # would cost one layer's keys per target layer at the prefill's peak, up to gigabytes at 1M tokens.
        # A turn's first boundary has no decode feedback yet, only the prompt window's, which has not looked at a
        # needle the question asks for: there the tower scores alone, as without a head (with the head, 16 of 20
        # dev planted facts at 2K against full attention's 20)
        use_head = self.feedback is not None and self.turn_steps != 0
        if use_head:
            n = None  # the head was trained on the tower's chunk-key logits
        token_keys = None
        if n is not None:
            token_keys = [self.store.mirror_k[layer][:, :, :n] for layer in self.targets]
            # the copies into the mirror (the prefill's on the compute stream, a flushed cycle's on the store's copy
            # stream) must have landed before the scorer copies blocks of it back; a mirror that is not pinned is
            # read by the host itself
            self.store.wait_mirror()
        probs = self.indexer.score(
            self.lookahead,
            self.lookahead_pos,
            self.chunk_keys.stacked(),
            self.layer_reduce,
            window_mask=self.lookahead_valid,
            chunk_offset=self.store.pad_len,
            token_keys=token_keys,
        )
        self.tower_probs = probs if use_head else None
        if not use_head:
            return probs
        features = self.feedback.features(logit_of(probs), self.store.seq_len - 1)
        head = self.indexer.feedback
        return torch.sigmoid(head(features.to(next(head.parameters()).device))).to(probs.device)

    def _tower_scores(self) -> torch.Tensor | None:
        return self.tower_probs

    def _boundary(self, first: bool) -> None:
        self.later_boundary = not first
        try:
            super()._boundary(first)
        finally:
            self.token_keys_len = None  # later boundaries score the chunk keys, unless later_boundary_keys says
            self.later_boundary = False

    def _valid_chunks(self, n: int) -> torch.Tensor:
        c = self.lsa.chunk_size
        ends = (torch.arange(n, device=self.store.device) + 1) * c
        return ends[None, :] > self.store.pad_len[:, None]

    def _sink_chunks(self, n: int) -> torch.Tensor:
        c = self.lsa.chunk_size
        starts = torch.arange(n, device=self.store.device) * c
        pad = self.store.pad_len[:, None]
        return (starts[None, :] >= pad) & (starts[None, :] + c <= pad + self.lsa.sink)

    def decode_mask(self, dtype: torch.dtype) -> torch.Tensor:
        """The attention mask of the current decode step for LSA layers. # [B, 1, 1, S]"""
        mask = self.store.attention_mask()
        if self.attn_impl == "eager":
            return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, torch.finfo(dtype).min)
        return mask

    def capture_lookahead(self, layer: int, hidden: torch.Tensor, position_ids: torch.Tensor | None) -> None:
        """Keep the newest ``query_window`` hidden states at a target layer (the next boundary's query).

        Args:
            layer: target decoder layer.
            hidden: hidden states entering its attention in this forward. # [B, q, hidden]
            position_ids: their rotary positions, if the caller passed them. # [B or 1, q]
        """
        self._keep_lookahead_hidden(layer, hidden)
        if layer != self.targets[0]:
            return
        window = self.lsa.query_window
        batch, q = hidden.shape[:2]
        seen = self.layers[layer].get_seq_length()
        index = torch.arange(seen, seen + q, device=hidden.device)[-window:]  # absolute (padded) indices
        pad = (self.pad_len if self.pad_len is not None else torch.zeros(batch, dtype=torch.long)).to(hidden.device)
        if position_ids is not None:
            pos = position_ids[:, -window:].to(hidden.device).expand(batch, -1)
        else:
            pos = (index[None, :] - pad[:, None]).clamp(min=0)
        valid = index[None, :] >= pad[:, None]
        if self.lookahead_pos is not None and q < window:
            pos = torch.cat([self.lookahead_pos, pos], 1)[:, -window:]
            valid = torch.cat([self.lookahead_valid, valid], 1)[:, -window:]
        self.lookahead_pos, self.lookahead_valid = pos, valid

    def set_padding(self, attention_mask: torch.Tensor) -> None:
        """Read left padding from a 2D attention mask at prefill; right padding is refused."""
        mask = attention_mask.to(torch.bool)
        pad = (~mask).long().cumprod(dim=1).sum(dim=1)
        if bool((mask.sum(dim=1) != mask.shape[1] - pad).any()):
            raise ValueError("LSACache needs left padding (tokenizer.padding_side = 'left')")
        self.pad_len = pad.cpu()

    def _other_device_tensors(self) -> list[torch.Tensor]:
        # the sliding-window layers' caches, untouched by LSA
        tensors = []
        for layer in self.layers:
            if not isinstance(layer, LSALayer) and layer.is_initialized:
                tensors += [layer.keys, layer.values]
        return tensors

    def full_kv_bytes(self, num_tokens: int | None = None) -> int:
        """Bytes a plain ``DynamicCache`` holds for this batch at ``num_tokens`` tokens (default: now)."""
        store = self.store
        n = store.seq_len if num_tokens is None else num_tokens
        elem = store.reserve_k[self.first_lsa_layer].element_size()
        return store.batch * full_cache_bytes(self.sequence_bytes(elem), n, self._other_bytes(n, elem))

    def sync_stats(self) -> None:
        """Bring counters that live on the device into :attr:`stats` (a no-op here; see the fast path)."""
