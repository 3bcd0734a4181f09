"""A prompt's keys and values, computed once and continued by several later requests (prefix reuse).

Several questions about one long document share everything up to the question. :meth:`PrefixKV.capture` runs
that shared part once and keeps every layer's keys and values in host memory (a sliding-window layer keeps only
its window); each question then starts from :meth:`PrefixKV.dynamic_cache` (full attention) or from an
:class:`~flashmemory.attention.cache.LSACache` built with ``prefix=`` (LSA), and prefills only its own tokens.
The question's tokens attend to the whole prefix exactly as in one prefill of the whole prompt, so each answer is
the one a fresh request would give, without the prefix's forward pass.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn
from transformers.cache_utils import Cache, CacheLayerMixin, DynamicCache

from ..memory.pinned import HOST_POOL, HostBlock, block_bytes
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
    """

    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    length: int
    window: list[int | None]
    blocks: list[HostBlock] = field(default_factory=list, repr=False)

    @classmethod
    @torch.no_grad()
    def capture(cls, model: nn.Module, input_ids: torch.Tensor) -> PrefixKV:
        """Run ``input_ids [B, T]`` through ``model`` once and keep its keys and values on the host.

        The device holds one layer's keys and values at a time beyond what the forward pass itself needs. Returns
        the prefix and nothing else of the forward: the tokens that follow make their own logits.
        """
        spec = backbone_spec(model)
        windows = [spec.sliding_window if t == "sliding_attention" else None for t in spec.layer_types]
        capture = _CaptureCache(windows)
        mask = torch.ones_like(input_ids)
        model(input_ids=input_ids, attention_mask=mask, past_key_values=capture, use_cache=True, logits_to_keep=1)
        if input_ids.device.type == "cuda":
            torch.cuda.synchronize(input_ids.device)  # the host copies were started asynchronously
        layers = capture.layers
        keys = [layer.host_keys for layer in layers]
        values = [layer.host_values for layer in layers]
        blocks = [layer.block for layer in layers if layer.block is not None]
        return cls(keys, values, int(input_ids.shape[1]), windows, blocks)

    @property
    def host_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.keys, *self.values))

    def layer(self, i: int, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer ``i``'s keys and values on ``device``."""
        # from page-locked memory (a CUDA capture) the copies run asynchronously; nothing writes the source again
        pinned = self.keys[i].is_pinned()
        return self.keys[i].to(device, dtype, non_blocking=pinned), self.values[i].to(
            device, dtype, non_blocking=pinned
        )

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

    def __init__(self, window: int | None) -> None:
        super().__init__()
        self.window = window
        self.seen = 0
        self.host_keys: torch.Tensor | None = None
        self.host_values: torch.Tensor | None = None
        self.block: HostBlock | None = None

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if self.seen:
            raise NotImplementedError("a prefix is captured in one forward pass")
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        keep = slice(None) if self.window is None else slice(-(self.window - 1), None)
        self.block, (self.host_keys, self.host_values) = _to_host(key_states[:, :, keep], value_states[:, :, keep])
        self.seen = key_states.shape[-2]
        return key_states, value_states

    def get_seq_length(self) -> int:
        return self.seen

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.seen + query_length, 0

    def get_max_length(self) -> int:
        return -1


def _to_host(*xs: torch.Tensor) -> tuple[HostBlock | None, list[torch.Tensor]]:
    """Host copies of ``xs``, page-locked in one leased block when they are on CUDA (the block is returned).

    Every question copies the whole prefix back to the device, and copies from pageable memory run at a fraction
    of the bus's speed: at 32K tokens of a Llama-3-8B shape they made a question slower than prefilling it whole.
    The copies are asynchronous; :meth:`PrefixKV.capture` waits for them.
    """
    if xs[0].device.type != "cuda":
        return None, [x.to("cpu", copy=True) for x in xs]
    shapes = [tuple(x.shape) for x in xs]
    block = HOST_POOL.lease(block_bytes(shapes, xs[0].dtype), xs[0].device)
    hosts = block.tensors(shapes, xs[0].dtype)
    for host, x in zip(hosts, xs, strict=True):
        host.copy_(x, non_blocking=True)
    return block, hosts


class _CaptureCache(Cache):
    def __init__(self, windows: list[int | None]) -> None:
        super().__init__(layers=[_CaptureLayer(w) for w in windows])


__all__ = ["PrefixKV"]
