"""InfLLM-style selection: a few representative keys per block, blocks ranked per layer at every step.

InfLLM (Xiao et al., 2024, arXiv 2402.04617) splits the history into blocks, keeps for each block the keys of
its most "representative" tokens (those receiving the most attention from the block's own queries), and at
every decode step loads the blocks whose representatives score highest against the current query, the same
blocks for every head of a layer. Published InfLLM keeps blocks in host memory with a device cache of blocks;
this implementation keeps the whole cache on the device and masks, and is charged for it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..attention.block_select import BlockScorer
from .block_method import BlockSelectMethod


@dataclass(slots=True)
class InfLLMScorer(BlockScorer):
    """Block score = sum over representatives and heads of ``q . k_rep``, shared by all heads of a layer.

    Args:
        num_reps: representative tokens per block and KV head. Default: 4.
    """

    num_reps: int = 4
    needs_queries = True

    def summarize(self, keys: torch.Tensor, queries: torch.Tensor | None) -> list[torch.Tensor]:
        batch, hkv, n, b, d = keys.shape
        qg = queries.float().view(batch, hkv, -1, n, b, d)  # [B, Hkv, G, n, b, D]
        logits = torch.einsum("hgnjd,hnmd->hnjm", qg.flatten(0, 1), keys.float().flatten(0, 1))  # [B*Hkv, n, b, b]
        causal = torch.ones(b, b, dtype=torch.bool, device=keys.device).tril()  # query j sees key m <= j
        received = logits.masked_fill(~causal, 0.0).sum(2) / causal.sum(0)  # mean over the queries that see m
        top = received.topk(min(self.num_reps, b), dim=-1).indices.view(batch, hkv, n, -1)  # [B, Hkv, n, r]
        reps = keys.gather(3, top[..., None].expand(-1, -1, -1, -1, d))  # [B, Hkv, n, r, D]
        return [reps]

    def score(self, query: torch.Tensor, meta: list[torch.Tensor]) -> torch.Tensor:
        (reps,) = meta  # [B, Hkv, N, r, D]
        per_head = torch.einsum("bhgd,bhnrd->bhn", query.float(), reps.float())  # [B, Hkv, N]
        return per_head.sum(dim=1, keepdim=True).expand_as(per_head)


class InfLLMSelector(BlockSelectMethod):
    """InfLLM with LSA's page (64 tokens) as its block and 4 representatives per block."""

    name = "infllm"

    def make_scorer(self) -> BlockScorer:
        return InfLLMScorer()

    def block_size(self, lsa) -> int:
        return lsa.page_size


__all__ = ["InfLLMScorer", "InfLLMSelector"]
