"""Trainable query tower: hidden state at a target layer -> per-head queries and per-head weights."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils import skip_init


class QueryTower(nn.Module):
    """Per target layer: a query projection (optionally per-head RMS-normed), head weights and a score bias.

    The projection starts as the backbone's own ``q_proj`` (see :meth:`MemoryIndexer.from_model`), so before any
    training the score of a chunk follows the attention logit of the layer's queries against the chunk's mean key.

    Args:
        num_layers: target layers.
        hidden_size: residual width.
        num_heads: query heads.
        head_dim: channels per head.
        use_bias: whether the query projection has a bias (Qwen2 does).
        use_q_norm: whether queries are RMS-normed per head before RoPE (Qwen3, Gemma3 do).
        rms_eps: epsilon of that norm.
        device: where the parameters are made. Default: the CPU.
    """

    def __init__(
        self,
        num_layers: int,
        hidden_size: int,
        num_heads: int,
        head_dim: int,
        *,
        use_bias: bool = False,
        use_q_norm: bool = False,
        rms_eps: float = 1e-6,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        device = torch.device("cpu") if device is None else device  # skip_init leaves a None device on meta
        self.num_heads, self.head_dim, self.rms_eps = num_heads, head_dim, rms_eps
        # every caller overwrites the projections (from the backbone's q_proj or a checkpoint): a random init of
        # them cost 1.3 s per request on a Llama-3-8B shape, so they start at zero instead (the head weights start
        # uniform, set below)
        self.q_proj = nn.ModuleList(
            skip_init(nn.Linear, hidden_size, num_heads * head_dim, bias=use_bias, device=device)
            for _ in range(num_layers)
        )
        with torch.no_grad():
            for proj in self.q_proj:
                proj.weight.zero_()
                if proj.bias is not None:
                    proj.bias.zero_()
        self.head_weight = nn.ModuleList(
            skip_init(nn.Linear, hidden_size, num_heads, device=device) for _ in range(num_layers)
        )
        self.q_norm = nn.Parameter(torch.ones(num_layers, head_dim, device=device)) if use_q_norm else None
        self.score_bias = nn.Parameter(torch.zeros(num_layers, device=device))
        for head in self.head_weight:
            nn.init.zeros_(head.weight)
            nn.init.constant_(head.bias, 1.0 / num_heads)

    def forward(self, layer: int, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Queries (before RoPE) and head weights for target layer number ``layer``.

        Args:
            layer: index into the target layers (not the decoder layer index).
            hidden: hidden states entering that layer's attention (after its input norm). # [..., hidden]

        Returns:
            Queries ``[..., H, D]`` and head weights ``[..., H]``.
        """
        q = self.q_proj[layer](hidden).unflatten(-1, (self.num_heads, self.head_dim))
        if self.q_norm is not None:
            var = q.float().pow(2).mean(-1, keepdim=True)
            q = (q.float() * torch.rsqrt(var + self.rms_eps) * self.q_norm[layer].float()).to(q.dtype)
        return q, self.head_weight[layer](hidden)
