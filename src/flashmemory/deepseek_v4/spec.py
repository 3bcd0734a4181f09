"""What LSA needs to know about a DeepSeek-V4 model, read from its config and modules.

DeepSeek-V4 has three kinds of attention layer: sliding-window only, CSA (a compressed entry every
``compress_rate`` tokens plus a lightning indexer that keeps the top-k entries per query) and HCA (a compressed
entry every 128 tokens, no indexer). Every layer also keeps a raw sliding window of recent tokens. LSA manages
the CSA layers; the others stay on the device as they are.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

SLIDING, CSA, HCA = "sliding_attention", "compressed_sparse_attention", "heavily_compressed_attention"


@dataclass(frozen=True, slots=True)
class DeepseekV4Spec:
    """Shapes and per-layer facts of a DeepSeek-V4 backbone.

    Args:
        num_layers: decoder layers.
        layer_types: ``SLIDING``, ``CSA`` or ``HCA`` per layer.
        hidden_size: residual width.
        head_dim: width of one attention entry (keys are values, one KV head).
        index_head_dim: width of one lightning-indexer key.
        index_num_heads: lightning-indexer query heads.
        index_topk: compressed entries each query keeps.
        q_lora_rank: width of the low-rank query both attention and the indexer project from.
        rope_dim: trailing channels of a head that carry RoPE.
        csa_rate: tokens per CSA entry.
        hca_rate: tokens per HCA entry.
        sliding_window: raw tokens every layer attends to.
    """

    num_layers: int
    layer_types: tuple[str, ...]
    hidden_size: int
    head_dim: int
    index_head_dim: int
    index_num_heads: int
    index_topk: int
    q_lora_rank: int
    rope_dim: int
    csa_rate: int
    hca_rate: int
    sliding_window: int

    @property
    def csa_layers(self) -> list[int]:
        """Layers with compressed entries and a lightning indexer: the ones LSA manages."""
        return [i for i, t in enumerate(self.layer_types) if t == CSA]

    @property
    def hca_layers(self) -> list[int]:
        return [i for i, t in enumerate(self.layer_types) if t == HCA]

    @property
    def sliding_layers(self) -> list[int]:
        return [i for i, t in enumerate(self.layer_types) if t == SLIDING]

    def default_target_layers(self) -> tuple[int, ...]:
        """Three CSA layers spread between 50% and 85% of the CSA stack (the Memory Indexer reads their keys)."""
        csa = self.csa_layers
        if not csa:
            raise ValueError("this DeepSeek-V4 model has no CSA layer: nothing for LSA to manage")
        picks = {csa[min(len(csa) - 1, int(f * len(csa)))] for f in (0.5, 0.67, 0.84)}
        return tuple(sorted(picks))

    def check_targets(self, targets: tuple[int, ...]) -> None:
        bad = [i for i in targets if not 0 <= i < self.num_layers or self.layer_types[i] != CSA]
        if bad:
            raise ValueError(f"target layers {bad} are not CSA layers of this model (CSA layers: {self.csa_layers})")


def is_deepseek_v4(model_or_config) -> bool:
    """True for a DeepSeek-V4 model or config."""
    config = getattr(model_or_config, "config", model_or_config)
    return getattr(config, "model_type", None) == "deepseek_v4"


def deepseek_v4_spec(model_or_config) -> DeepseekV4Spec:
    """Read a :class:`DeepseekV4Spec` from a model or its config."""
    cfg = getattr(model_or_config, "config", model_or_config)
    if not is_deepseek_v4(cfg):
        raise ValueError(f"expected a DeepSeek-V4 model, got model_type {getattr(cfg, 'model_type', None)!r}")
    rates = cfg.compress_rates
    return DeepseekV4Spec(
        num_layers=cfg.num_hidden_layers,
        layer_types=tuple(cfg.layer_types),
        hidden_size=cfg.hidden_size,
        head_dim=cfg.head_dim,
        index_head_dim=cfg.index_head_dim,
        index_num_heads=cfg.index_n_heads,
        index_topk=cfg.index_topk,
        q_lora_rank=cfg.q_lora_rank,
        rope_dim=int(cfg.head_dim * cfg.partial_rotary_factor),
        csa_rate=int(rates[CSA]),
        hca_rate=int(rates[HCA]),
        sliding_window=cfg.sliding_window,
    )


def attention(model: nn.Module, layer: int) -> nn.Module:
    """The attention block of decoder layer ``layer``."""
    return model.model.layers[layer].self_attn


def native_indexer(model: nn.Module, layer: int) -> nn.Module:
    """The lightning indexer of CSA layer ``layer``."""
    compressor = attention(model, layer).compressor
    indexer = getattr(compressor, "indexer", None)
    if indexer is None:
        raise ValueError(f"layer {layer} has no lightning indexer (not a CSA layer)")
    return indexer
