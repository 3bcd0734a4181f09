"""What LSA needs to know about a decoder model, read from its config and modules (any family)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:
    from ..config import LSAConfig

# Zero-shot scorer layers measured by decoding, per architecture shape (BackboneSpec.shape_key). Qwen2.5 0.5B:
# layer 13 alone beat the 45-70% band's mean by 10.5 / 3.0 / 2.4 points at 4K / 8K / 16K on RULER's dev split
# (benchmarks/results/ruler_dev_layers_h200), and gained on the held-out grid samples too.
MEASURED_ZERO_SHOT_LAYERS: dict[tuple, tuple[int, ...]] = {
    ("qwen2", 24, 896, 14, 2): (13,),
}
# Prompt length from which the first boundary scores chunks by their best token (LSAConfig.token_keys_from), per
# architecture shape. Token keys at every length unless measured otherwise: with the zero-shot indexer they gained on
# both backbones measured. Qwen2.5 0.5B (layer 13): +6.5 / +6.1 / +5.5 / +5.8 RULER points at 4K / 8K / 16K / 32K on
# the grid's held-out samples (benchmarks/results/ruler_qwen_h200_v2_token_keys*), chosen on the dev split
# (benchmarks/results/ruler_dev_token_keys_h200). SmolLM2-135M's shape scores token keys from 3072 tokens, measured
# with the checkpoint it shipped before f2f8b2f: on 100 dev planted facts per length they found 3-10 more than
# chunk keys at 4K, 6K and 7K (as many at 4K with 32-token pages), and 18 fewer at 2K
# (benchmarks/results/planted_fact_smollm2_pages_h200); on RULER's dev split at 4K (prompts of about 3980 tokens)
# they score 31.2 against 18.1 (benchmarks/results/ruler_dev_pages_smollm2_cpu). 3072 lies between the two.
DEFAULT_TOKEN_KEYS_FROM = 0
MEASURED_TOKEN_KEYS_FROM: dict[tuple, int] = {
    ("llama", 30, 576, 9, 3): 3072,
}
# Chunks per recalled page (LSAConfig.page_chunks), per architecture shape: 4 (64 tokens) unless measured
# otherwise. A page is the unit the budget is spent in, so at short prompts a budget holds only a few: SmolLM2 at 2K
# and a fifth of the KV has 2-3 pages of 64 tokens. Pages of 32 tokens found 8 more dev planted facts of 100 at 2K
# and 5 more at 4K with the checkpoint it shipped then (benchmarks/results/planted_fact_smollm2_pages_h200). On
# RULER's dev split at 4K they score the same as 64-token pages with token keys (31.2), and 2.3 points below with
# chunk keys (benchmarks/results/ruler_dev_pages_smollm2_cpu). Qwen's RULER lost with smaller pages (dev_pages_h200).
DEFAULT_PAGE_CHUNKS = 4
MEASURED_PAGE_CHUNKS: dict[tuple, int] = {
    ("llama", 30, 576, 9, 3): 2,
}
# Chunks after a scored chunk that inherit its score (LSAConfig.follow_chunks), per architecture shape: none unless
# measured otherwise. Small pages cut a value from the key it follows more often. SmolLM2's shape (32-token pages,
# the checkpoint shipped since f2f8b2f): on 100 dev planted facts per length one follower found 0 / 3 / 3 / 3 more
# at 2K / 4K / 6K / 7K, and on the held-out facts 0 / 4 / 2 / 3 more
# (benchmarks/results/planted_fact_smollm2_tail_h200); on RULER's dev split at 8K it recovered two niah_single_2
# values cut at a page boundary (benchmarks/results/ruler_dev_band_smollm2_cpu). Qwen's RULER dev split moved by
# under a point with one (benchmarks/results/ruler_dev_follow_chunks_h200).
DEFAULT_FOLLOW_CHUNKS = 0
MEASURED_FOLLOW_CHUNKS: dict[tuple, int] = {
    ("llama", 30, 576, 9, 3): 1,
}


@dataclass(frozen=True, slots=True)
class BackboneSpec:
    """Shapes and per-layer facts of a decoder backbone.

    Args:
        num_layers: decoder layers.
        layer_types: ``"full_attention"``, ``"sliding_attention"``... per layer.
        num_heads: query heads.
        num_kv_heads: key/value heads.
        head_dim: channels per head.
        hidden_size: residual width.
        sliding_window: window of the sliding layers, if any.
        model_type: the config's ``model_type``.
    """

    num_layers: int
    layer_types: tuple[str, ...]
    num_heads: int
    num_kv_heads: int
    head_dim: int
    hidden_size: int
    sliding_window: int | None
    model_type: str

    @property
    def full_layers(self) -> list[int]:
        """Layers that keep the whole history: the ones LSA manages."""
        return [i for i, t in enumerate(self.layer_types) if t == "full_attention"]

    def default_target_layers(self) -> tuple[int, ...]:
        """The zero-shot scorer's layers: the measured best for this shape, else the middle band of the depth.

        The band is the full-attention layers between 45% and 70% of the full-attention stack, and
        :meth:`default_layer_reduce` averages over them. Which single layer retrieves best differs between models
        (Qwen2.5-Coder-0.5B: layer 13 of 24; SmolLM2-135M: layers 21-23 of 30), and the max over a few layers
        lets the one with the largest logits decide alone, which was the worst of the scorers measured
        (``benchmarks/results/needle_pages_*``). The band's mean did well on both.
        """
        full = self.full_layers
        if not full:
            raise ValueError(f"{self.model_type} has no full-attention layer: nothing for LSA to manage")
        measured = MEASURED_ZERO_SHOT_LAYERS.get(self.shape_key)
        if measured is not None:
            return measured
        n = len(full)
        return tuple(full[int(0.45 * n) : int(0.7 * n) + 1])

    def default_token_keys_from(self) -> int:
        """Prompt length from which ``first_boundary_keys="auto"`` scores token keys on this backbone."""
        return MEASURED_TOKEN_KEYS_FROM.get(self.shape_key, DEFAULT_TOKEN_KEYS_FROM)

    def default_page_chunks(self) -> int:
        """Chunks per recalled page on this backbone when ``LSAConfig.page_chunks`` is unset."""
        return MEASURED_PAGE_CHUNKS.get(self.shape_key, DEFAULT_PAGE_CHUNKS)

    def default_follow_chunks(self) -> int:
        """Chunks that inherit a scored chunk's score on this backbone when ``LSAConfig.follow_chunks`` is unset."""
        return MEASURED_FOLLOW_CHUNKS.get(self.shape_key, DEFAULT_FOLLOW_CHUNKS)

    def resolve_counts(self, lsa: LSAConfig) -> LSAConfig:
        """``lsa`` with the counts it leaves unset (``page_chunks``, ``follow_chunks``) taken from this backbone."""
        return lsa.with_page_chunks(self.default_page_chunks()).with_follow_chunks(self.default_follow_chunks())

    def default_layer_reduce(self) -> str:
        """How the zero-shot scorer combines its default layers (see :meth:`default_target_layers`)."""
        return "mean"

    def scorer(
        self, target_layers: tuple[int, ...] | None, layer_reduce: str | None, zero_shot: bool = True
    ) -> tuple[tuple[int, ...], str]:
        """Layers and reduction an indexer scores with, from ``LSAConfig.target_layers`` and ``layer_reduce``.

        Unset layers are the model's defaults. An unset reduction is the default one for the zero-shot indexer on
        its default layers, else ``"max"`` (layers the user names, a checkpoint that records no reduction), as they
        were measured.
        """
        layers = tuple(target_layers) if target_layers else self.default_target_layers()
        on_default_layers = zero_shot and not target_layers
        return layers, layer_reduce or (self.default_layer_reduce() if on_default_layers else "max")

    @property
    def shape_key(self) -> tuple:
        """What identifies an architecture's shape (not its weights): family, depth and widths."""
        return (self.model_type, self.num_layers, self.hidden_size, self.num_heads, self.num_kv_heads)


def text_config(config):
    """The decoder config of a (possibly multimodal) model config."""
    return config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config


def backbone_spec(model_or_config) -> BackboneSpec:
    """Read a :class:`BackboneSpec` from a model or its config."""
    cfg = text_config(getattr(model_or_config, "config", model_or_config))
    num_layers = cfg.num_hidden_layers
    layer_types = getattr(cfg, "layer_types", None)
    if layer_types is None:
        sliding = getattr(cfg, "sliding_window", None) is not None and getattr(cfg, "use_sliding_window", True)
        layer_types = ["sliding_attention" if sliding else "full_attention"] * num_layers
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    return BackboneSpec(
        num_layers=num_layers,
        layer_types=tuple(layer_types),
        num_heads=cfg.num_attention_heads,
        num_kv_heads=getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads,
        head_dim=head_dim,
        hidden_size=cfg.hidden_size,
        sliding_window=getattr(cfg, "sliding_window", None),
        model_type=getattr(cfg, "model_type", "unknown"),
    )


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The list of decoder blocks of a causal LM."""
    for path in ("model.layers", "model.language_model.layers", "transformer.h", "layers"):
        obj = model
        try:
            for name in path.split("."):
                obj = getattr(obj, name)
        except AttributeError:
            continue
        if isinstance(obj, nn.ModuleList):
            return obj
    raise ValueError(f"cannot find the decoder layers of {type(model).__name__}")


def attention_module(model: nn.Module, layer_idx: int) -> nn.Module:
    """The self-attention module of decoder layer ``layer_idx``."""
    layer = decoder_layers(model)[layer_idx]
    attn = getattr(layer, "self_attn", None)
    if attn is None or not hasattr(attn, "q_proj"):
        raise ValueError(f"layer {layer_idx} of {type(model).__name__} has no self_attn.q_proj")
    return attn


def rope_parameters(model: nn.Module, layer_idx: int) -> tuple[torch.Tensor, float]:
    """Inverse frequencies and output scaling of the rotary embedding used by ``layer_idx``.

    Kept as plain numbers so a query tower can rotate its queries without the backbone.
    """
    spec = backbone_spec(model)
    layer_type = spec.layer_types[layer_idx]
    for owner in (
        getattr(model, "model", None),
        getattr(getattr(model, "model", None), "language_model", None),
    ):
        rotary = getattr(owner, "rotary_emb", None)
        if rotary is None:
            continue
        inv = getattr(rotary, f"{layer_type}_inv_freq", None)
        scale = getattr(rotary, f"{layer_type}_attention_scaling", None)
        if inv is None:
            inv, scale = getattr(rotary, "inv_freq", None), getattr(rotary, "attention_scaling", 1.0)
        if inv is not None:
            return inv.detach().float().cpu().clone(), float(scale if scale is not None else 1.0)
    raise ValueError(f"cannot find the rotary embedding of {type(model).__name__}")


def rotated_queries(
    attn: nn.Module, head_dim: int, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> torch.Tensor:
    """The post-rotary queries a Llama-family attention module computes from ``hidden``.

    Args:
        attn: the attention module (its ``q_proj`` and optional ``q_norm``).
        head_dim: channels per head.
        hidden: its input. # [..., rows, hidden]
        cos: rotary cosines of those rows, broadcastable to the queries. # [..., rows, 1, D]
        sin: rotary sines, likewise. # [..., rows, 1, D]

    Returns:
        Queries. # [..., rows, H, D]
    """
    q = attn.q_proj(hidden).unflatten(-1, (-1, head_dim))
    if getattr(attn, "q_norm", None) is not None:
        q = attn.q_norm(q)
    return _rotate(q, cos, sin)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Llama-family rotary embedding in the half-split layout, given the cosines and sines."""
    half = x.shape[-1] // 2
    return x * cos + torch.cat([-x[..., half:], x[..., :half]], dim=-1) * sin


def apply_rope(x: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor, scaling: float) -> torch.Tensor:
    """Rotate ``x`` the way Llama-family attention rotates queries (half-split layout).

    Args:
        x: per-head vectors. # [..., H, D]
        positions: absolute positions, broadcastable to ``x.shape[:-2]``.
        inv_freq: inverse frequencies. # [D/2]
        scaling: multiplier of cos and sin.
    """
    freqs = positions.to(torch.float32)[..., None] * inv_freq.to(x.device, torch.float32)  # [..., D/2]
    emb = torch.cat([freqs, freqs], dim=-1)[..., None, :]  # [..., 1, D]
    cos, sin = (emb.cos() * scaling).to(x.dtype), (emb.sin() * scaling).to(x.dtype)
    return _rotate(x, cos, sin)
