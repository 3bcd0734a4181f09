"""Quest-style selection: per-block min/max keys bound ``q . k``; the best blocks per KV head, every step.

Quest (Tang et al., 2024, arXiv 2406.10774) keeps, per page of keys, the element-wise minimum and maximum key;
for a query ``q`` the largest possible logit in the page is ``sum_d max(q_d * kmin_d, q_d * kmax_d)``. It
re-selects pages at every decode step and every layer, and keeps the whole cache on the device.
"""

from __future__ import annotations

import torch

from ..attention.block_select import BlockScorer
from .block_method import BlockSelectMethod


class QuestScorer(BlockScorer):
    """Upper bound of the attention logit per block, max over the query heads sharing a KV head."""

    def summarize(self, keys: torch.Tensor, queries: torch.Tensor | None) -> list[torch.Tensor]:
        return [keys.amin(dim=3), keys.amax(dim=3)]  # 2 x [B, Hkv, n, D]

    def score(self, query: torch.Tensor, meta: list[torch.Tensor]) -> torch.Tensor:
        kmin, kmax = meta  # [B, Hkv, N, D]
        q = query.float().unsqueeze(-2)  # [B, Hkv, G, 1, D]
        bound = torch.maximum(q * kmin.float().unsqueeze(2), q * kmax.float().unsqueeze(2)).sum(-1)  # [B, Hkv, G, N]
        return bound.amax(dim=2)


class QuestSelector(BlockSelectMethod):
    """Quest with LSA's chunk (16 tokens, Quest's own page size) as its page."""

    name = "quest"

    def make_scorer(self) -> BlockScorer:
        return QuestScorer()

    def block_size(self, lsa) -> int:
        return lsa.chunk_size


__all__ = ["QuestScorer", "QuestSelector"]
