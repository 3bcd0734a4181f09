"""How much device and host memory a request needs, from a model's configuration alone.

Whether a context fits is a question of shapes: a full cache holds every layer's keys and values for every
token, LSA holds its reserve (sink, page slots, recent tail), its chunk keys and the untouched layers' state on the
device and the whole history in its host mirror. This module computes those sizes exactly as
:class:`~flashmemory.attention.cache.LSACache` plans them, without loading weights, so that a user can ask "does
1M tokens of this model fit on my GPU, and how much host memory does it take?" before running anything.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig

from ..config import LSAConfig
from ..memory.layout import (
    BudgetError,
    backbone_sequence_bytes,
    full_cache_bytes,
    plan_layout,
    reserve_bytes,
    sliding_layers_bytes,
)
from ..models.adapter import backbone_spec
from ..models.loader import ModelLoadError, prepare_model_folder
from ..models.shapes import SHAPES, shape_config


@dataclass(frozen=True, slots=True)
class MemoryPlan:
    """Memory of one request shape. Bytes are for the whole batch.

    Attributes:
        context: prompt tokens per sequence.
        max_new_tokens: most tokens each sequence generates.
        batch: sequences decoded together.
        full_device_bytes: a full cache at ``context + max_new_tokens`` tokens.
        lsa_device_bytes: LSA's device KV at most: reserve, chunk keys of ``context + max_new_tokens`` tokens and
            the layers LSA leaves alone; the runtime never holds more.
        host_bytes: LSA's host mirror, every token's keys and values (page-locked on CUDA, at this exact size).
        weight_bytes: the model's parameters at the planned dtype.
        page_slots: pages LSA keeps resident per sequence.
        total_pages: pages of the whole sequence.
        error: why LSA cannot run this shape (the budget cannot hold its fixed part); None when it can.
    """

    context: int
    max_new_tokens: int
    batch: int
    full_device_bytes: int
    lsa_device_bytes: int
    host_bytes: int
    weight_bytes: int
    page_slots: int
    total_pages: int
    error: str | None = None

    @property
    def kv_ratio(self) -> float:
        """LSA's device KV as a share of the full cache's."""
        return self.lsa_device_bytes / self.full_device_bytes

    def max_batch(self, device_bytes: float, host_bytes: float | None = None) -> tuple[int, int]:
        """Most sequences of this shape that fit: ``(full attention, LSA)``.

        Counts weights and KV only (what a prefill's activations need comes on top). LSA is also bounded by
        ``host_bytes`` for its mirrors, when given.
        """
        room = device_bytes - self.weight_bytes
        full = max(0, int(room // (self.full_device_bytes / self.batch)))
        if self.error is not None:
            return full, 0
        lsa = max(0, int(room // (self.lsa_device_bytes / self.batch)))
        if host_bytes is not None:
            lsa = min(lsa, max(0, int(host_bytes // (self.host_bytes / self.batch))))
        return full, lsa

    def to_dict(self) -> dict:
        return asdict(self) | {"kv_ratio": self.kv_ratio}


def load_config(model: str) -> PretrainedConfig:
    """The configuration of ``model``: a name from :data:`~flashmemory.models.shapes.SHAPES` or
    ``deepseek-v4-flash``, a packaged model's
    short name, a ``.gguf`` file, or a Hugging Face folder (or its ``config.json``). No weights are loaded; a
    packaged or GGUF model is converted once into the model cache, as ``flashmemory ask`` would."""
    if model in SHAPES:
        return shape_config(model)
    if model == "deepseek-v4-flash":
        from ..deepseek_v4.configs import flash_config

        return flash_config()
    if model.endswith("config.json"):
        model = model[: -len("config.json")] or "."
    try:
        folder = prepare_model_folder(model, progress=False)
    except ModelLoadError as err:
        if "Unknown model" not in str(err):
            raise
        known = ", ".join([*SHAPES, "deepseek-v4-flash"])
        raise ModelLoadError(f"{err} Architectures known without files: {known}.") from None
    return AutoConfig.from_pretrained(folder)


def plan_memory(
    config: PretrainedConfig,
    lsa: LSAConfig | None = None,
    *,
    context: int,
    max_new_tokens: int = 256,
    batch: int = 1,
    dtype: torch.dtype = torch.bfloat16,
) -> MemoryPlan:
    """Device and host memory of ``batch`` sequences of ``context`` prompt tokens and ``max_new_tokens`` answers.

    The zero-shot indexer's layers are the ones whose chunk keys are counted (a shipped checkpoint may read a few
    layers more or fewer: a difference of some chunk keys).

    Raises:
        ValueError: a context, answer length or batch below 1.
    """
    if context < 1 or max_new_tokens < 1 or batch < 1:
        raise ValueError(f"context, max_new_tokens and batch must be >= 1, got {context}, {max_new_tokens}, {batch}")
    if getattr(config, "model_type", None) == "deepseek_v4":
        return _plan_deepseek_v4(config, lsa, context, max_new_tokens, batch, dtype)
    spec = backbone_spec(config)
    lsa = spec.resolve_counts(lsa or LSAConfig())
    targets, _ = spec.scorer(lsa.target_layers, None, zero_shot=lsa.target_layers is None)
    elem = dtype.itemsize
    seq = backbone_sequence_bytes(spec, len(targets), elem)
    max_len = context + max_new_tokens
    full = full_cache_bytes(seq, max_len, sliding_layers_bytes(spec, max_len, elem))
    host = seq.per_token * max_len
    total_pages = math.ceil(max_len / lsa.page_size)
    other = sliding_layers_bytes(spec, context, elem)
    try:
        layout = plan_layout(lsa, seq, context_len=context, max_len=max_len, other_layers_full=other)
    except BudgetError as err:
        layout, error = None, str(err)
    else:
        error = None
    device = 0 if layout is None else reserve_bytes(layout, seq, math.ceil(max_len / lsa.chunk_size))
    return MemoryPlan(
        context=context,
        max_new_tokens=max_new_tokens,
        batch=batch,
        full_device_bytes=batch * full,
        lsa_device_bytes=batch * device,
        host_bytes=batch * host,
        weight_bytes=weight_bytes(config, dtype),
        page_slots=0 if layout is None else layout.num_page_slots,
        total_pages=total_pages,
        error=error,
    )


def _plan_deepseek_v4(
    config: PretrainedConfig, lsa: LSAConfig | None, context: int, max_new_tokens: int, batch: int, dtype: torch.dtype
) -> MemoryPlan:
    """DeepSeek-V4: LSA manages the CSA entries (one per ``csa_rate`` tokens) and their indexer keys; the HCA
    entries, sliding windows and compressor state stay on the device (:mod:`flashmemory.deepseek_v4.accounting`)."""
    from ..deepseek_v4.accounting import full_cache_bytes as v4_full
    from ..deepseek_v4.accounting import lsa_cache_bytes, plan_reserve
    from ..deepseek_v4.cache import deepseek_v4_lsa_config
    from ..deepseek_v4.spec import deepseek_v4_spec

    spec = deepseek_v4_spec(config)
    lsa = lsa or LSAConfig()
    # settings already in CSA entries are kept; generic ones (chunks of 16 tokens) become V4's defaults
    cfg = lsa if lsa.chunk_size == spec.csa_rate else deepseek_v4_lsa_config(budget=lsa.budget)
    targets = len(spec.default_target_layers())
    elem, max_len = dtype.itemsize, context + max_new_tokens
    full = v4_full(spec, max_len, elem=elem, batch=batch).total
    try:
        layout = plan_reserve(
            spec, cfg, num_targets=targets, context_tokens=context, max_new_tokens=max_new_tokens, elem=elem
        )
    except BudgetError as err:
        layout, error = None, str(err)
    else:
        error = None
    device = (
        0
        if layout is None
        else lsa_cache_bytes(spec, layout, max_len, num_targets=targets, elem=elem, batch=batch).total
    )
    entries = max_len // spec.csa_rate + 1  # the entry mirror's capacity, as the cache allocates it
    host = batch * entries * len(spec.csa_layers) * (spec.head_dim + spec.index_head_dim) * elem
    return MemoryPlan(
        context=context,
        max_new_tokens=max_new_tokens,
        batch=batch,
        full_device_bytes=full,
        lsa_device_bytes=device,
        host_bytes=host,
        weight_bytes=weight_bytes(config, dtype),
        page_slots=0 if layout is None else layout.num_page_slots,
        total_pages=math.ceil(entries / cfg.page_chunks),
        error=error,
    )


def weight_bytes(config: PretrainedConfig, dtype: torch.dtype) -> int:
    """Bytes of the model's parameters at ``dtype``, from a model built on the meta device (no memory)."""
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return sum(p.numel() for p in model.parameters()) * dtype.itemsize


__all__ = ["MemoryPlan", "load_config", "plan_memory", "weight_bytes"]
