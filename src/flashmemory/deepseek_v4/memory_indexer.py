"""The Memory Indexer of DeepSeek-V4: the native lightning indexer's query path against its frozen keys.

Key tower: the compressed indexer keys of a few CSA target layers, exactly as the model computed them (after
their norm and RoPE), one per entry. Query tower: a copy of the native indexer's query path of each target
layer: the query projection from the low-rank query (``q_b_proj``) and the per-head weights (``weights_proj``,
times ``H^-1/2``). Untrained, its logit of an entry is the native index score, so it ranks entries the way the
lightning indexer does; sigmoid, cross-layer max, page density, tail and sink come from the generic indexer.

The tower's input at a target layer is ``[q_residual | x]``: the low-rank query and the attention input of a
token. Channels are stored in the half-split RoPE layout (:mod:`.rope`), so the generic scorer and trainer run it
unchanged. This module imports no model classes: the backbone-free trainer loads it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..indexer.memory_indexer import NUM_DISTANCE_BUCKETS, IndexerSpec, MemoryIndexer
from .rope import half_split_inv_freq, half_split_permutation
from .spec import DeepseekV4Spec, deepseek_v4_spec, native_indexer

CHECKPOINT_FORMAT = "flashmemory-indexer-deepseek-v4/1"


@dataclass(slots=True)
class DeepseekV4IndexerSpec(IndexerSpec):
    """:class:`IndexerSpec` plus the split of the tower's input.

    Args:
        q_lora_rank: leading channels of the input that form the low-rank query; the rest is the attention input.
        rope_dim: trailing channels of a V4 indexer head that carry RoPE (before the half-split permutation).
    """

    q_lora_rank: int = 0
    rope_dim: int = 0


class DeepseekV4QueryTower(nn.Module):
    """Per target layer: ``q = q_proj(q_residual)`` and head weights ``w = head_weight(x)``, plus a score bias.

    Args:
        num_layers: target layers.
        q_lora_rank: width of the low-rank query.
        hidden_size: width of the attention input.
        num_heads: indexer heads.
        head_dim: indexer head width.
    """

    def __init__(self, num_layers: int, q_lora_rank: int, hidden_size: int, num_heads: int, head_dim: int) -> None:
        super().__init__()
        self.q_lora_rank, self.num_heads, self.head_dim = q_lora_rank, num_heads, head_dim
        self.q_proj = nn.ModuleList(nn.Linear(q_lora_rank, num_heads * head_dim, bias=False) for _ in range(num_layers))
        self.head_weight = nn.ModuleList(nn.Linear(hidden_size, num_heads) for _ in range(num_layers))
        self.score_bias = nn.Parameter(torch.zeros(num_layers))
        for head in self.head_weight:
            nn.init.zeros_(head.bias)

    def forward(self, layer: int, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Queries ``[..., H, D]`` (half-split layout, before RoPE) and head weights ``[..., H]``.

        Args:
            layer: index into the target layers.
            hidden: ``[q_residual | x]`` of the query tokens. # [..., q_lora_rank + hidden]
        """
        q = self.q_proj[layer](hidden[..., : self.q_lora_rank]).unflatten(-1, (self.num_heads, self.head_dim))
        return q, self.head_weight[layer](hidden[..., self.q_lora_rank :])


class DeepseekV4MemoryIndexer(MemoryIndexer):
    """A :class:`MemoryIndexer` whose query tower is DeepSeek-V4's lightning-indexer query path.

    Args:
        spec: shapes and provenance.
        inv_freq: half-split rotary frequencies per target layer. # [L, D/2]
    """

    checkpoint_format = CHECKPOINT_FORMAT

    def __init__(self, spec: DeepseekV4IndexerSpec, inv_freq: torch.Tensor | None = None) -> None:
        nn.Module.__init__(self)  # the generic tower is not built: this one replaces it
        self.spec = spec
        n = len(spec.target_layers)
        self.tower = DeepseekV4QueryTower(
            n, spec.q_lora_rank, spec.hidden_size - spec.q_lora_rank, spec.num_heads, spec.head_dim
        )
        self.register_buffer("inv_freq", (torch.zeros(n, spec.head_dim // 2) if inv_freq is None else inv_freq).float())
        self.distance_bias = nn.Parameter(torch.zeros(n, NUM_DISTANCE_BUCKETS))
        if spec.rope_scaling is None:
            spec.rope_scaling = [1.0] * n

    @property
    def key_permutation(self) -> torch.Tensor:
        """Channel order turning a native indexer key into the tower's layout. # [D]"""
        return half_split_permutation(self.spec.head_dim, self.spec.rope_dim)

    @staticmethod
    def permutation_for(v4: DeepseekV4Spec) -> torch.Tensor:
        """:attr:`key_permutation` of the indexers of a V4 backbone. # [D_idx]"""
        return half_split_permutation(v4.index_head_dim, v4.rope_dim)

    @classmethod
    def from_model(
        cls,
        model: nn.Module,
        target_layers: tuple[int, ...],
        *,
        chunk_size: int | None = None,
        backbone: str = "",
        fingerprint: str = "",
    ) -> DeepseekV4MemoryIndexer:
        """Zero-shot indexer copied from the native lightning indexers of ``target_layers``."""
        v4 = deepseek_v4_spec(model)
        v4.check_targets(tuple(target_layers))
        if chunk_size is not None and chunk_size != v4.csa_rate:
            raise ValueError(
                f"a DeepSeek-V4 chunk is one CSA entry ({v4.csa_rate} tokens), got chunk_size={chunk_size}"
            )
        natives = [native_indexer(model, i) for i in target_layers]
        scales = [float(n.rotary_emb.compress_attention_scaling) for n in natives]
        if any(s != 1.0 for s in scales):
            # The half-split layout rotates the former nope channels by angle 0, which a scale would not spare.
            raise ValueError(f"the compress RoPE scales its output ({scales}); the V4 query tower assumes 1.0")
        spec = DeepseekV4IndexerSpec(
            backbone=backbone,
            fingerprint=fingerprint,
            target_layers=list(target_layers),
            hidden_size=v4.q_lora_rank + v4.hidden_size,
            num_heads=v4.index_num_heads,
            num_kv_heads=1,
            head_dim=v4.index_head_dim,
            chunk_size=v4.csa_rate,
            rope_scaling=scales,
            q_lora_rank=v4.q_lora_rank,
            rope_dim=v4.rope_dim,
        )
        inv = torch.stack([half_split_inv_freq(n.rotary_emb.compress_inv_freq, v4.index_head_dim) for n in natives])
        indexer = cls(spec, inv)
        perm = indexer.key_permutation
        with torch.no_grad():
            for j, native in enumerate(natives):
                w = native.q_b_proj.weight.float().view(v4.index_num_heads, v4.index_head_dim, -1)
                indexer.tower.q_proj[j].weight.copy_(w[:, perm].reshape(-1, w.shape[-1]))
                weights = native.scorer.weights_proj.weight.float() * native.scorer.weights_scaling
                indexer.tower.head_weight[j].weight.copy_(weights)
        return indexer.to(device=next(model.parameters()).device)


SPEC_CLASS = DeepseekV4IndexerSpec
INDEXER_CLASS = DeepseekV4MemoryIndexer
