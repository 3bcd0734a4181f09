"""The GPU fast path of LSA: paged sparse decode attention, host-sync-free boundaries, graph-capturable steps.

:class:`FastLSACache` is an :class:`LSACache` whose decode steps

- attend with :func:`~flashmemory.attention.sparse_decode.sparse_decode` straight over the reserve, through
  the page table, instead of transformers' attention with a mask over every slot;
- keep their per-step state on the device (:class:`~flashmemory.memory.async_store.AsyncKVStore`), so no
  step waits for the host and a CUDA graph of one indexer-free step can be replayed (see
  :mod:`flashmemory.runtime.graph_step`);
- recall pages on a side stream at boundaries, with chunk keys taken from the reserve's tail and no host sync.

It reaches the kernel through an attention implementation registered under a new name (existing names are never
replaced): the model's implementation is switched to it while the cache is open and restored by :meth:`close`.
For every call that is not an LSA decode step it runs the model's original attention (sdpa or eager) and mask.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, eager_mask, sdpa_mask
from transformers.modeling_utils import AttentionInterface
from transformers.models.llama.modeling_llama import eager_attention_forward

from ..config import LSAConfig
from ..indexer.memory_indexer import MemoryIndexer
from ..memory.async_store import AsyncKVStore
from .cache import LSACache, LSALayer
from .sparse_decode import resolve_backend, sparse_decode, triton_available
from .sparse_decode_ref import ResidentSet

_BASES = {"sdpa": (sdpa_attention_forward, sdpa_mask), "eager": (eager_attention_forward, eager_mask)}


@dataclass(slots=True)
class SparseDecodeMask:
    """Stands in for the attention mask of an LSA layer during a fast-path decode step.

    Args:
        resident: what the reserve holds (device tensors updated in place).
        backend: ``"triton"`` or ``"torch"``.
    """

    resident: ResidentSet
    backend: str


def _make_attention(base: str):
    fallback = _BASES[base][0]

    def lsa_sparse_attention(
        module: nn.Module,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask,
        dropout: float = 0.0,
        scaling: float | None = None,
        **kwargs,
    ) -> tuple[torch.Tensor, None]:
        """transformers attention signature; query ``[B, Hq, q, D]``, key/value ``[B, Hkv, S, D]``."""
        if not isinstance(attention_mask, SparseDecodeMask):
            return fallback(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
        out = sparse_decode(
            query[:, :, 0], key, value, attention_mask.resident, scaling, backend=attention_mask.backend
        )
        return out.unsqueeze(1), None  # [B, 1, Hq, D], the layout transformers' attention functions return

    return lsa_sparse_attention


def attention_key(base: str) -> str:
    """Register (once) and return the name of the fast-path attention over the base implementation ``base``."""
    name = f"lsa_sparse_{base}"  # a name without "flash": transformers reads those as flash-attention kernels
    if name not in AttentionInterface._global_mapping:
        AttentionInterface.register(name, _make_attention(base))
        AttentionMaskInterface.register(name, _skip_decode_mask(_BASES[base][1]))
    return name


def _skip_decode_mask(base_mask: Callable) -> Callable:
    """``base_mask``, but no mask at all for a one-token query with no padding, as transformers does outside tracing.

    transformers builds the full mask whenever a CUDA graph is being captured (it cannot tell a capture from an
    export), so a compiled decoder would see ``None`` while warming up and a tensor inside the capture: its guards
    fail and it compiles there, which breaks the capture as soon as compiling touches the device (autotuning). A
    one-token query attends to the whole cache in either case, so the mask is never needed.
    """

    def mask(*args, **kwargs):
        local = kwargs.get("local_size")
        if (
            not args
            and kwargs.get("q_length") == 1
            and kwargs.get("attention_mask") is None
            and kwargs.get("allow_is_causal_skip", True)
            and (local is None or kwargs["kv_length"] < local)
        ):
            return None
        return base_mask(*args, **kwargs)

    return mask


def resolve_attention_backend(lsa: LSAConfig, device: torch.device) -> str:
    """``"auto"`` becomes ``"triton"`` on CUDA with Triton importable, else ``"mask"``."""
    if lsa.attention_backend == "auto":
        return "triton" if device.type == "cuda" and triton_available() else "mask"
    if lsa.attention_backend == "triton":
        resolve_backend("triton", device)  # clear error when Triton is missing
    return lsa.attention_backend


class FastLSACache(LSACache):
    """:class:`LSACache` on the fast path (see the module docstring). Same arguments, plus ``backend``.

    Args:
        backend: sparse decode backend, ``"triton"`` or ``"torch"``. Default: "triton".
    """

    counts_feedback = False  # replayed graph steps run no hooks

    store_class = AsyncKVStore
    supports_prefetch = True

    def __init__(
        self,
        model: nn.Module,
        lsa: LSAConfig | None = None,
        indexer: MemoryIndexer | None = None,
        *,
        backend: str = "triton",
        **kwargs,
    ) -> None:
        super().__init__(model, lsa, indexer, **kwargs)
        if backend not in ("triton", "torch"):
            raise ValueError(f"FastLSACache backend must be 'triton' or 'torch', got {backend!r}")
        self.backend = backend
        self._model = model
        self._base_impl = self.attn_impl
        self._above_pending: list[torch.Tensor] = []
        self._mask: SparseDecodeMask | None = None
        model.set_attn_implementation(attention_key(self._base_impl))

    def close(self) -> None:
        if not self.closed:
            self._model.set_attn_implementation(self._base_impl)
        super().close()

    def decode_mask(self, dtype: torch.dtype) -> SparseDecodeMask:
        if self._mask is None:
            s = self.store
            rs = ResidentSet(
                s.page_table, s.sink_len, s.lo, s.tail_start_dev, s.seq_len_dev, s.layout.sink, s.layout.page_size
            )
            self._mask = SparseDecodeMask(rs, self.backend)
        return self._mask

    def _close_cycle(self) -> None:
        # key the cycle's chunks before end_cycle slides the tail they are read from
        self._extend_chunk_keys_from_tail()
        self.store.end_cycle()

    def _recall(self, pages: torch.Tensor) -> None:
        # only enqueued: the boundary's times are the host's, the device copies asynchronously and sync_stats
        # reads the counts
        self.store.recall(pages)

    def _key_tail_chunks(self) -> None:
        self._extend_chunk_keys_from_tail()

    def _extend_chunk_keys_from_tail(self) -> None:
        """New chunk keys from the reserve's tail before it slides: no round trip through the host mirror."""
        store, c = self.store, self.lsa.chunk_size
        start = self.chunk_keys.num_chunks * c
        end = store.seq_len // c * c
        if end <= start:
            return
        for layer in self.targets:
            self.chunk_keys.extend(layer, store.reserve_tokens(layer, start, end), start, self.pad_len, store.device)

    def _record_kept(self, scores: torch.Tensor) -> None:
        # a device scalar now, a float in sync_stats: reading it here would stall the host on the device
        self._above_pending.append((scores > self.lsa.threshold).float().mean())

    def capture_lookahead(self, layer: int, hidden: torch.Tensor, position_ids: torch.Tensor | None) -> None:
        """As in :class:`LSACache`, but a full window rolls in place during decode (graph-capturable)."""
        buf = self.lookahead.get(layer)
        window = self.lsa.query_window
        if hidden.shape[1] != 1 or buf is None or buf.shape[1] < window:
            super().capture_lookahead(layer, hidden, position_ids)
            if layer == self.targets[0]:  # own the buffers (they may be expanded views) so they can roll in place
                self.lookahead_pos = self.lookahead_pos.clone()
                self.lookahead_valid = self.lookahead_valid.clone()
            return
        buf[:, :-1].copy_(buf[:, 1:].clone())
        buf[:, -1:].copy_(hidden)
        if layer != self.targets[0]:
            return
        pos, valid = self.lookahead_pos, self.lookahead_valid
        new_pos = (
            pos[:, -1:] + 1 if position_ids is None else position_ids[:, -1:].to(pos.device).expand_as(pos[:, -1:])
        )
        pos[:, :-1].copy_(pos[:, 1:].clone())
        pos[:, -1:].copy_(new_pos)
        valid[:, :-1].copy_(valid[:, 1:].clone())
        valid[:, -1:].fill_(True)

    def next_step_is_boundary(self) -> bool:
        """Whether the coming decode step starts with cycle work (boundary or prefetch; never graph-replayed)."""
        return (
            not self.in_decode
            or self.steps_in_cycle == self.lsa.interval
            or self._early_boundary_due()
            or self._prefetch_due()
        )

    def advance_replayed_step(self) -> None:
        """Host bookkeeping of one decode step whose device work a CUDA graph replayed."""
        if self.next_step_is_boundary():
            raise RuntimeError("a boundary step cannot be replayed from a graph: run it eagerly")
        self.store.advance_host()
        self.steps_in_cycle += 1
        self.turn_steps += 1
        for layer in self.layers:
            if isinstance(layer, LSALayer):
                layer.num_seen += 1

    def sync_stats(self) -> None:
        """Read the device-side copy counts into :attr:`stats` (waits for them)."""
        counts = self.store.sync_log() if self.store is not None else []
        self.stats.pages_recalled = list(counts)
        self.stats.above_threshold.extend(float(k) for k in self._above_pending)
        self._above_pending.clear()


def build_lsa_cache(
    model: nn.Module,
    lsa: LSAConfig | None = None,
    indexer: MemoryIndexer | None = None,
    **kwargs,
) -> LSACache:
    """An :class:`LSACache` on the attention backend ``lsa.attention_backend`` asks for (``"auto"`` resolved here).

    Args:
        model: the causal LM.
        lsa: LSA settings. Default: ``LSAConfig()``.
        indexer: Memory Indexer; ``None`` builds the zero-shot one.
        **kwargs: passed to the cache (``max_new_tokens``, ``forced_pages``).
    """
    lsa = lsa or LSAConfig()
    backend = lsa_cache_backend(model, lsa, indexer)
    if backend == "mask":
        return LSACache(model, lsa, indexer, **kwargs)
    return FastLSACache(model, lsa, indexer, backend=backend, **kwargs)


def lsa_cache_backend(model: nn.Module, lsa: LSAConfig | None = None, indexer: MemoryIndexer | None = None) -> str:
    """The attention backend :func:`build_lsa_cache` builds for these settings: ``"mask"`` (an :class:`LSACache`),
    or ``"triton"`` / ``"torch"`` (a :class:`FastLSACache`). ``"auto"`` falls back to ``"mask"`` where the fast path
    cannot run: no Triton or no CUDA, an attention implementation it does not wrap, or attention feedback asked for
    an indexer with a feedback head (counted on the masked path only)."""
    lsa = lsa or LSAConfig()
    backend = resolve_attention_backend(lsa, next(model.parameters()).device)
    if backend != "mask" and getattr(model.config, "_attn_implementation", "sdpa") not in _BASES:
        backend = "mask" if lsa.attention_backend == "auto" else backend
    if backend != "mask" and lsa.attention_feedback is True and getattr(indexer, "feedback", None) is not None:
        if lsa.attention_backend != "auto":
            raise ValueError(
                f"attention_feedback=True counts attention on the 'mask' backend only: use attention_backend='mask' "
                f"(or 'auto'), or leave attention_feedback at None for the {lsa.attention_backend!r} backend (the "
                f"head is then left out)"
            )
        backend = "mask"
    return backend
