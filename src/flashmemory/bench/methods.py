"""The methods a benchmark compares: full attention, LSA (shipped or zero-shot indexer) and page-choice baselines.

Every LSA-like method decodes through the same :class:`LSACache` with the same budget, so the device KV bytes
they report come from the same physical storage and differ only in which pages the reserve holds.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable

import torch
from torch import nn

from ..attention.cache import LSACache
from ..config import LSAConfig
from ..indexer.memory_indexer import MemoryIndexer
from ..indexer.shipped import resolve_indexer
from ..runtime.generate import generate_ids
from ..runtime.stats import GenerationStats

PageChooser = Callable[[LSACache], torch.Tensor]


class Method:
    """One way of decoding a prompt; subclasses set :attr:`name` and implement :meth:`run`."""

    name: str = ""

    def run(
        self,
        model: nn.Module,
        tokenizer,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None,
        max_new_tokens: int,
        lsa: LSAConfig,
    ) -> tuple[list[list[int]], GenerationStats]:
        """Greedy-decode the prompts.

        Args:
            model: causal LM.
            tokenizer: its tokenizer (only ``eos_token_id`` is read).
            input_ids: left-padded prompts. # [B, T]
            attention_mask: 1 for real tokens. # [B, T]
            max_new_tokens: decode steps at most.
            lsa: LSA settings (ignored by ``full``).

        Returns:
            Generated ids per prompt (cut before the first EOS) and the accounting.
        """
        raise NotImplementedError


def _stops(tokenizer) -> list[int]:
    eos = getattr(tokenizer, "eos_token_id", None)
    if eos is None:
        return []
    return [eos] if isinstance(eos, int) else list(eos)


def _until_eos(ids: torch.Tensor, stops: list[int]) -> list[list[int]]:
    out = []
    for row in ids.cpu().tolist():
        cut = next((i for i, t in enumerate(row) if t in stops), len(row))
        out.append(row[:cut])
    return out


class FullAttention(Method):
    """The reference: a plain dynamic cache holding every token on the device."""

    name = "full"

    def run(self, model, tokenizer, input_ids, attention_mask, max_new_tokens, lsa):
        stops = _stops(tokenizer)
        ids, stats = generate_ids(
            model, input_ids, attention_mask, method="full", max_new_tokens=max_new_tokens, eos_token_id=stops
        )
        return _until_eos(ids, stops), stats


class LSAMethod(Method):
    """LSA through an :class:`LSACache`; subclasses change the indexer or replace page choice.

    Args:
        name: the registry name.
        indexer: ``"auto"`` (shipped checkpoint matching the model, else zero-shot) or ``"zero-shot"``.
    """

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

    def run(self, model, tokenizer, input_ids, attention_mask, max_new_tokens, lsa):
        stops = _stops(tokenizer)
        indexer = self.resolve(model)
        forced = self.page_chooser()
        ids, stats = generate_ids(
            model,
            input_ids,
            attention_mask,
            method="lsa",
            lsa=lsa,
            indexer=indexer,
            max_new_tokens=max_new_tokens,
            eos_token_id=stops,
            cache_factory=lambda m: LSACache(m, lsa, indexer, max_new_tokens=max_new_tokens, forced_pages=forced),
        )
        return _until_eos(ids, stops), stats


def _pad_slots(pages: torch.Tensor, k: int) -> torch.Tensor:
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
            k, selectable = store.layout.num_page_slots, store.selectable_pages()
            pages = torch.arange(max(selectable - k, 0), selectable, dtype=torch.long)
            return _pad_slots(pages.expand(store.batch, -1), k)

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
            k, selectable = store.layout.num_page_slots, store.selectable_pages()
            rows = [torch.randperm(selectable, generator=gen)[:k] for _ in range(store.batch)]
            return _pad_slots(torch.stack(rows), k)

        return choose


METHODS: dict[str, Method] = {
    "full": FullAttention(),
    "lsa": LSAMethod("lsa", "auto"),
    "lsa-zeroshot": LSAMethod("lsa-zeroshot", "zero-shot"),
    "recent": RecentPages(),
    "random": RandomPages(),
}


def get_method(name: str, *, seed: int = 0) -> Method:
    """The registered method ``name`` (``random`` seeded with ``seed``); ValueError listing valid names."""
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; valid methods: {', '.join(METHODS)}")
    return RandomPages(seed) if name == "random" else METHODS[name]


__all__ = [
    "METHODS",
    "FullAttention",
    "LSAMethod",
    "Method",
    "RandomPages",
    "RecentPages",
    "get_method",
]
