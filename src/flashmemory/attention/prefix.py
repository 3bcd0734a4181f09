"""A prompt's keys and values, computed once and continued by several later requests (prefix reuse).

Several questions about one long document share everything up to the question. :meth:`PrefixKV.capture` runs
that shared part once and keeps every layer's keys and values in host memory (a sliding-window layer keeps only
its window); each question then starts from :meth:`PrefixKV.dynamic_cache` (full attention) or from an
:class:`~flashmemory.attention.cache.LSACache` built with ``prefix=`` (LSA), and prefills only its own tokens.
The question's tokens attend to the whole prefix exactly as in one prefill of the whole prompt, so each answer is
the one a fresh request would give, without the prefix's forward pass.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from transformers.cache_utils import Cache, CacheLayerMixin, DynamicCache

from ..memory.host_rows import copy_to_host_slice, keys_to_device
from ..memory.kv_files import load_layers, save_layers
from ..memory.pinned import HOST_POOL, HostBlock, block_bytes
from ..memory.store import PrefilledMirror
from ..models.adapter import backbone_spec


@dataclass(slots=True)
class PrefixKV:
    """Per-layer keys and values of one unpadded prompt prefix.

    Attributes:
        keys: post-rotary keys per decoder layer, on the host. # [B, Hkv, T or W-1, D]
        values: values per decoder layer, same shapes.
        length: tokens in the prefix.
        window: per layer, the sliding window (its layers keep the last ``window - 1`` tokens), None for full ones.
        blocks: the page-locked host blocks the keys and values live in (a CUDA capture), held while the prefix is.
        room: tokens of room after the prefix in each full-attention layer's host tensors (see :meth:`lend_mirror`).
        spans: per layer, the whole host tensors (``length + room`` tokens) that ``keys`` and ``values`` are the front
            of; None for a sliding layer.
    """

    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    length: int
    window: list[int | None]
    blocks: list[HostBlock] = field(default_factory=list, repr=False)
    room: int = 0
    spans: list[tuple[torch.Tensor, torch.Tensor] | None] = field(default_factory=list, repr=False)
    _borrower: weakref.ref | None = field(default=None, init=False, repr=False)

    @classmethod
    @torch.no_grad()
    def capture(cls, model: nn.Module, input_ids: torch.Tensor, room: int = 0) -> PrefixKV:
        """Run ``input_ids [B, T]`` through ``model`` once and keep its keys and values on the host.

        The device holds one layer's keys and values at a time beyond what the forward pass itself needs. Returns
        the prefix and nothing else of the forward: the tokens that follow make their own logits.

        Args:
            model: the causal LM.
            input_ids: the prefix's tokens. # [B, T]
            room: tokens of room to leave after the prefix in every full-attention layer's host tensors, so that an
                LSA cache continuing it can use them as its host mirror (:meth:`lend_mirror`). Default: 0.
        """
        if room < 0:
            raise ValueError(f"room must be >= 0, got {room}")
        windows = layer_windows(model)
        capture = _CaptureCache(windows, room)
        mask = torch.ones_like(input_ids)
        model(input_ids=input_ids, attention_mask=mask, past_key_values=capture, use_cache=True, logits_to_keep=1)
        if input_ids.device.type == "cuda":
            torch.cuda.synchronize(input_ids.device)  # the host copies were started asynchronously
        layers = capture.layers
        keys = [layer.host_keys for layer in layers]
        values = [layer.host_values for layer in layers]
        blocks = [layer.block for layer in layers if layer.block is not None]
        spans = [layer.spans for layer in layers]
        return cls(keys, values, int(input_ids.shape[1]), windows, blocks, room, spans)

    def save(self, folder: str | Path, manifest: dict) -> Path:
        """Write the prefix into ``folder`` (see :mod:`flashmemory.memory.kv_files`), with ``manifest`` describing
        what it belongs to; an existing folder is left as it is."""
        layers = [
            {"keys": k.contiguous(), "values": v.contiguous()} for k, v in zip(self.keys, self.values, strict=True)
        ]
        return save_layers(folder, layers, {**manifest, "length": self.length, "window": self.window})

    @classmethod
    def load(cls, folder: str | Path, expect: dict, device: torch.device, room: int = 0) -> PrefixKV:
        """Read a prefix written by :meth:`save` whose manifest agrees with ``expect``; page-locked when it will be
        copied to a CUDA ``device``, with ``room`` as in :meth:`capture`.

        Raises:
            KVFileError: a damaged folder, or one saved for another model, dtype, prompt or layer layout.
        """
        layers, manifest = load_layers(folder, expect)
        keys, values, blocks, spans = [], [], [], []
        device = torch.device(device)
        windows = list(manifest["window"])
        for layer, window in zip(layers, windows, strict=True):
            k, v = layer["keys"], layer["values"]
            grow = room if window is None else 0
            if device.type == "cuda" or grow:
                block, (k, v), span = _host_copies(k, v, pin_for=device if device.type == "cuda" else None, room=grow)
                blocks += [block] if block is not None else []
            else:
                span = None
            keys.append(k)
            values.append(v)
            spans.append(span if window is None else None)
        return cls(keys, values, int(manifest["length"]), windows, blocks, room, spans)

    @property
    def host_bytes(self) -> int:
        """Bytes of the host tensors holding the prefix, the room after it included."""
        tensors = [t for i in range(len(self.keys)) for t in self._whole(i)]
        return sum(t.numel() * t.element_size() for t in tensors)

    def _whole(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        span = self.spans[i] if self.spans else None
        return span if span is not None else (self.keys[i], self.values[i])

    def layer(self, i: int, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer ``i``'s keys and values on ``device``."""
        # from page-locked memory (a CUDA capture) the copies run asynchronously; nothing writes the source again.
        # With room after the prefix its rows are strided: each (sequence, head) row goes across on its own.
        k, v = (keys_to_device(t, torch.device(device)) for t in (self.keys[i], self.values[i]))
        return k.to(dtype), v.to(dtype)

    def lend_mirror(self, layers: list[int], capacity: int, dtype: torch.dtype) -> PrefilledMirror | None:
        """The full-attention layers' host tensors, for one LSA cache at a time to use as its mirror.

        The prefix's tokens are already in place there, so the cache's prefill writes only the tokens after them,
        and the cache locks no host memory of its own. Returns None when the tensors cannot hold ``capacity``
        tokens of ``dtype`` or another cache still uses them; that cache may write after the prefix until it is
        gone.
        """
        if self.room == 0 or (self._borrower is not None and self._borrower() is not None):
            return None
        keys, values = {}, {}
        for i in layers:
            span = self.spans[i] if i < len(self.spans) else None
            if span is None or span[0].shape[2] < capacity or span[0].dtype != dtype:
                return None
            keys[i], values[i] = span
        lent = PrefilledMirror(keys, values, self.length, owner=self)
        self._borrower = weakref.ref(lent)
        return lent

    def dynamic_cache(self, model: nn.Module) -> DynamicCache:
        """A full-attention cache holding the prefix, on the model's device, ready for the next tokens."""
        device = next(model.parameters()).device
        cache = DynamicCache(config=model.config)
        for i, layer in enumerate(cache.layers):
            k, v = self.layer(i, device, self.keys[i].dtype)
            layer.update(k, v)
            if hasattr(layer, "cumulative_length"):  # a sliding layer was handed its window, not the whole prefix
                layer.cumulative_length = self.length
        return cache


class _CaptureLayer(CacheLayerMixin):
    """Hands a prefill's keys and values straight to attention and keeps a host copy of them."""

    is_sliding = False
    is_compileable = False

    def __init__(self, window: int | None, room: int) -> None:
        super().__init__()
        self.window = window
        self.room = room if window is None else 0
        self.seen = 0
        self.host_keys: torch.Tensor | None = None
        self.host_values: torch.Tensor | None = None
        self.block: HostBlock | None = None
        self.spans: tuple[torch.Tensor, torch.Tensor] | None = None

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if self.seen:
            raise NotImplementedError("a prefix is captured in one forward pass")
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        keep = slice(None) if self.window is None else slice(-(self.window - 1), None)
        k, v = key_states[:, :, keep], value_states[:, :, keep]
        self.block, (self.host_keys, self.host_values), spans = _host_copies(k, v, pin_for=k.device, room=self.room)
        self.spans = spans if self.window is None else None
        self.seen = key_states.shape[-2]
        return key_states, value_states

    def get_seq_length(self) -> int:
        return self.seen

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.seen + query_length, 0

    def get_max_length(self) -> int:
        return -1


def layer_windows(model: nn.Module) -> list[int | None]:
    """Per decoder layer, its sliding window, or None for a full-attention layer."""
    spec = backbone_spec(model)
    return [spec.sliding_window if t == "sliding_attention" else None for t in spec.layer_types]


def _host_copies(
    *xs: torch.Tensor, pin_for: torch.device | None, room: int = 0
) -> tuple[HostBlock | None, list[torch.Tensor], tuple[torch.Tensor, ...]]:
    """Host copies of ``xs [B, H, T, D]``; page-locked in one leased block (returned with them) when they will be
    copied to the CUDA device ``pin_for``. Each copy is the front of a host tensor with ``room`` more tokens, also
    returned (the copies themselves when ``room`` is 0).

    Every question copies the whole prefix back to the device, and copies from pageable memory run at a fraction
    of the bus's speed: at 32K tokens of a Llama-3-8B shape they made a question slower than prefilling it whole.
    Copies from the device are asynchronous; :meth:`PrefixKV.capture` waits for them.
    """
    shapes = [(*x.shape[:2], x.shape[2] + room, x.shape[3]) for x in xs]
    if pin_for is None or pin_for.type != "cuda":
        block, wholes = None, [torch.empty(s, dtype=x.dtype) for s, x in zip(shapes, xs, strict=True)]
    else:
        block = HOST_POOL.lease(block_bytes(shapes, xs[0].dtype), pin_for)
        wholes = block.tensors(shapes, xs[0].dtype)
    hosts = [whole[:, :, : x.shape[2]] for whole, x in zip(wholes, xs, strict=True)]
    for host, x in zip(hosts, xs, strict=True):
        copy_to_host_slice(x, host)
    return block, hosts, tuple(wholes)


class _CaptureCache(Cache):
    def __init__(self, windows: list[int | None], room: int) -> None:
        super().__init__(layers=[_CaptureLayer(w, room) for w in windows])


__all__ = ["PrefixKV", "layer_windows"]
