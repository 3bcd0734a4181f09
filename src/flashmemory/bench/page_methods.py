"""Full attention, LSA (shipped or zero-shot indexer) and the paper's page-choice baselines.

Every LSA-like method decodes through the same :class:`LSACache` with the same budget, so the device KV bytes
they report come from the same physical storage and differ only in which pages the reserve holds.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable

import torch
from torch import nn

from ..attention.cache import LSACache
from ..attention.fast_path import build_lsa_cache
from ..config import LSAConfig
from ..indexer.memory_indexer import MemoryIndexer
from ..indexer.shipped import resolve_indexer
from ..runtime.generate import generate_ids
from ..runtime.stats import GenerationStats
from .method_base import Method, decode_greedy, followup_len, stop_ids, until_eos

PageChooser = Callable[[LSACache], torch.Tensor]

RESERVE_NOTE = "LSA reserve (sink, page slots, recent tail) + chunk keys; the history lives in host memory"


class FullAttention(Method):
    """The reference: a plain dynamic cache holding every token on the device."""

    name = "full"
    kv_note = "whole cache on the device"

    def run(self, model, tokenizer, input_ids, attention_mask, max_new_tokens, lsa, followup=None):
        return decode_greedy(model, tokenizer, input_ids, attention_mask, max_new_tokens, followup)


class LSAMethod(Method):
    """LSA through an :class:`LSACache`; subclasses change the indexer or replace page choice.

    Args:
        name: the registry name.
        indexer: ``"auto"`` (shipped checkpoint matching the model, else zero-shot) or ``"zero-shot"``.
    """

    kv_note = RESERVE_NOTE

    def __init__(self, name: str = "lsa", indexer: str = "auto") -> None:
        self.name = name
        self.indexer = indexer
        # Resolving hashes the model's weights; do it once per model, without keeping the model alive.
        self._resolved: weakref.WeakKeyDictionary[nn.Module, MemoryIndexer | None] = weakref.WeakKeyDictionary()

    def resolve(self, model: nn.Module) -> MemoryIndexer | None:
        if model not in self._resolved:
            self._resolved[model] = resolve_indexer(model, self.indexer)
        return self._resolved[model]

    def page_chooser(self) -> PageChooser | None:
        """``None`` lets the indexer choose; baselines return a ``(cache) -> [B, K]`` callable."""
        return None

    def run(self, model, tokenizer, input_ids, attention_mask, max_new_tokens, lsa, followup=None):
        chooser = self.page_chooser()
        return self.decode(model, tokenizer, input_ids, attention_mask, max_new_tokens, lsa, chooser, followup)

    def decode(
        self,
        model: nn.Module,
        tokenizer,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None,
        max_new_tokens: int,
        lsa: LSAConfig,
        forced: PageChooser | None,
        followup: torch.Tensor | None = None,
    ) -> tuple[list[list[int]], GenerationStats]:
        """:meth:`run` with an explicit page chooser (``None``: the indexer chooses)."""
        stops = stop_ids(tokenizer)
        indexer = self.resolve(model)
        steps = max_new_tokens + followup_len(followup)
        ids, stats = generate_ids(
            model,
            input_ids,
            attention_mask,
            method="lsa",
            lsa=lsa,
            indexer=indexer,
            max_new_tokens=max_new_tokens,
            eos_token_id=stops,
            cache_factory=lambda m: bench_cache(m, lsa, indexer, steps, forced),
            # every page method decodes on the eager path its recorded results were made on
            cuda_graph=False,
            followup_ids=followup,
        )
        return until_eos(ids, stops), stats


def bench_cache(
    model: nn.Module, lsa: LSAConfig, indexer: MemoryIndexer | None, max_new_tokens: int, forced: PageChooser | None
) -> LSACache:
    """The cache an LSA-like method decodes with.

    The masked path unless the settings ask for the fast path (an explicit ``attention_backend``, or
    ``prefetch_steps``): the recorded tables then come from the same attention code on the CPU and the GPU.
    """
    if lsa.attention_backend == "auto" and not lsa.prefetch_steps:
        return LSACache(model, lsa, indexer, max_new_tokens=max_new_tokens, forced_pages=forced)
    return build_lsa_cache(model, lsa, indexer, max_new_tokens=max_new_tokens, forced_pages=forced)


def pad_slots(pages: torch.Tensor, k: int) -> torch.Tensor:
    """Cut or pad page ids ``[..., n]`` to ``k`` slots; -1 marks an empty slot."""
    # Fewer selectable pages than slots: the rest of the reserve stays empty (-1), as the indexer path does.
    if pages.shape[-1] >= k:
        return pages[..., :k]
    fill = torch.full((*pages.shape[:-1], k - pages.shape[-1]), -1, dtype=torch.long, device=pages.device)
    return torch.cat([pages, fill], dim=-1)


class RecentPages(LSAMethod):
    """Baseline: the reserve holds the newest selectable pages (a longer sliding window of the same bytes)."""

    def __init__(self) -> None:
        super().__init__("recent", "zero-shot")

    def page_chooser(self) -> PageChooser:
        def choose(cache: LSACache) -> torch.Tensor:
            store = cache.store
            k, selectable = store.layout.num_page_slots, cache.selectable_pages()
            pages = torch.arange(max(selectable - k, 0), selectable, dtype=torch.long)
            return pad_slots(pages.expand(store.batch, -1), k)

        return choose


class RandomPages(LSAMethod):
    """Baseline: the reserve holds K uniformly random selectable pages, redrawn at every boundary.

    Args:
        seed: seed of the generator; each :meth:`run` starts it afresh so a row is reproducible on its own.
    """

    def __init__(self, seed: int = 0) -> None:
        super().__init__("random", "zero-shot")
        self.seed = seed

    def page_chooser(self) -> PageChooser:
        gen = torch.Generator().manual_seed(self.seed)

        def choose(cache: LSACache) -> torch.Tensor:
            store = cache.store
            k, selectable = store.layout.num_page_slots, cache.selectable_pages()
            rows = [torch.randperm(selectable, generator=gen)[:k] for _ in range(store.batch)]
            return pad_slots(torch.stack(rows), k)

        return choose


__all__ = ["FullAttention", "LSAMethod", "PageChooser", "RandomPages", "RecentPages", "pad_slots"]
