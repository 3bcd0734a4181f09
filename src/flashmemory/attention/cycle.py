"""The LSA decode cycle shared by every LSA cache: boundary work, page choice and KV byte accounting.

A cache that mixes in :class:`LSACycle` holds ``lsa`` (:class:`~flashmemory.config.LSAConfig`), ``store`` (a
store with ``recall``/``end_cycle``/``begin_step``), ``chunk_keys``, ``indexer``, ``forced_pages``,
``lookahead``/``lookahead_pos``, ``hooks`` and the counters set by :meth:`LSACycle.init_cycle`. What differs
between backbones (how chunk keys grow, how the indexer is asked, which other layers hold device state) is a
small method each cache overrides.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Self

import torch

from ..indexer.scoring import follow_scores, select_pages
from ..memory.accounting import storage_bytes
from ..memory.async_store import first_valid


@dataclass(slots=True)
class CycleStats:
    """What happened at cycle boundaries and how much device memory the KV took."""

    boundaries: int = 0
    prefetches: int = 0
    pages_recalled: list[int] = field(default_factory=list)
    select_seconds: float = 0.0
    recall_seconds: float = 0.0
    peak_device_bytes: int = 0
    above_threshold: list[float] = field(default_factory=list)


class LSACycle:
    """Mixin for a transformers ``Cache``: the boundary / decode-step logic of LSA on top of a page store."""

    supports_prefetch = False  # caches whose store can copy pages ahead of a boundary say so

    def init_cycle(self, max_new_tokens: int, forced_pages) -> None:
        """Counters and per-request state of the cycle (called from the cache's ``__init__``)."""
        if self.lsa.prefetch_steps and not self.supports_prefetch:
            raise ValueError(
                f"LSAConfig.prefetch_steps={self.lsa.prefetch_steps} needs the fast path: set attention_backend to "
                f"'triton' (CUDA) or 'torch'; {type(self).__name__} copies pages only at boundaries"
            )
        self.max_new_tokens = max_new_tokens
        self.forced_pages = forced_pages
        self.store = None
        self.in_decode = False
        self.steps_in_cycle = 0
        self.turn_steps = 0  # decode steps since the turn's first boundary (the warm-up boundaries count from it)
        self.stats = CycleStats()
        self.lookahead: dict[int, torch.Tensor] = {}
        self.lookahead_pos: torch.Tensor | None = None
        self.last_scores: torch.Tensor | None = None  # chunk probabilities of the latest boundary, for inspection
        self.closed = False
        self.spare_slots = 0  # page slots kept empty for prefetched pages; set once the reserve exists
        self._choice_pages: int | None = None  # pages a prefetch may choose from (beyond the current tail start)
        self.boundary_requested = False
        self.turn_scores: torch.Tensor | None = None  # chunk scores of the turn's first boundary (its question)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Remove the hooks this cache put on the model; the cache cannot decode afterwards."""
        self.hooks.remove()
        self.closed = True

    def begin_decode_step(self) -> None:
        """Called once per decode forward, before the first LSA layer attends: boundary work, then the new slot."""
        if not self.in_decode:
            self.in_decode = True
            self.spare_slots = self._spare_slots()
            self._boundary(first=True)
        elif self.steps_in_cycle == self.lsa.interval or self._early_boundary_due():
            self._boundary(first=False)
        elif self._prefetch_due():
            self._prefetch()
        self._begin_store_step()
        self.steps_in_cycle += 1
        self.turn_steps += 1
        self.stats.peak_device_bytes = max(self.stats.peak_device_bytes, self.device_kv_bytes())

    def request_boundary(self) -> None:
        """Start a new cycle at the next decode step, before ``interval`` steps have passed.

        For a new turn fed through decode steps (a question after a long document): the resident set is then chosen
        with the newest tokens, the turn's own, as the lookahead query instead of waiting up to ``interval`` steps.
        A prefetch still pending is dropped: it was chosen before the turn.
        """
        self.boundary_requested = True

    def _early_boundary_due(self) -> bool:
        """A boundary before ``interval`` steps: one the caller requested, or a warm-up boundary of the turn."""
        return self.steps_in_cycle > 0 and (self.boundary_requested or self._at_warmup_step())

    def _at_warmup_step(self) -> bool:
        """Whether the turn has run one of ``warmup_steps`` steps; 0 (the turn's first boundary) never is one.

        A prefetch never sees it true: at such a step the cycle takes a boundary instead.
        """
        return self.turn_steps in self.lsa.warmup_steps

    def _begin_store_step(self) -> None:
        self.store.begin_step()

    def _boundary(self, first: bool) -> None:
        t0 = time.perf_counter()
        if not first:
            self._close_cycle()
        self.steps_in_cycle = 0
        self.stats.boundaries += 1
        early, self.boundary_requested = self.boundary_requested, False
        if first or early:
            self.turn_steps = 0
            self.turn_scores = None
        # a prefetch chosen before a new turn, or before the answer's first tokens, is stale
        if (early or self._at_warmup_step()) and self.spare_slots and self.store.prefetch_pending:
            self.store.drop_prefetch()
        if self.spare_slots and self.store.prefetch_pending:
            # the pages were chosen and copied `prefetch_steps` steps ago: only the page table changes now
            self.store.commit_prefetch()
            self.stats.recall_seconds += time.perf_counter() - t0
            return
        pages = self._choose_pages()
        t1 = time.perf_counter()
        self._recall(pages)
        t2 = time.perf_counter()
        self.stats.select_seconds += t1 - t0
        self.stats.recall_seconds += t2 - t1

    def _spare_slots(self) -> int:
        """Page slots kept empty for prefetched pages (0: no prefetch).

        No slot is spared when the reserve holds every page of the request anyway (nothing to choose, so nothing
        to hide) or has a single slot.
        """
        k = self.store.layout.num_page_slots
        if not self.lsa.prefetch_steps or k < 2 or k * self.store.layout.page_size >= self.store.capacity:
            return 0
        return min(k - 1, max(1, round(self.lsa.prefetch_share * k)))

    def _prefetch_due(self) -> bool:
        return self.spare_slots > 0 and self.steps_in_cycle == self.lsa.interval - self.lsa.prefetch_steps

    def selectable_pages(self) -> int:
        """Pages the current choice may pick (page choosers such as the bench baselines read this).

        At a boundary, the pages before the tail; at a prefetch, the pages before the tail that the coming boundary
        will leave.
        """
        return self.store.selectable_pages() if self._choice_pages is None else self._choice_pages

    def _prefetch(self) -> None:
        """Choose the next cycle's pages now and start copying the new ones into the spare slots.

        The pages that leave the recent tail at the coming boundary are already complete in the reserve, so they
        are keyed and may be chosen now; the store copies those from the tail, the others from the host mirror.
        """
        t0 = time.perf_counter()
        self._key_tail_chunks()
        self._choice_pages = self.store.selectable_pages_ahead(self.lsa.prefetch_steps)
        try:
            pages = self._choose_pages(by_rank=True)
        finally:
            self._choice_pages = None
        t1 = time.perf_counter()
        k = self.store.layout.num_page_slots
        self.store.prefetch(pages, max_incoming=self.spare_slots, max_pages=k - self.spare_slots)
        self.stats.prefetches += 1
        self.stats.select_seconds += t1 - t0
        self.stats.recall_seconds += time.perf_counter() - t1

    def _close_cycle(self) -> None:
        """Flush the finished cycle to the host mirror, then key its completed chunks."""
        self.store.end_cycle()
        self._extend_chunk_keys()

    def _recall(self, pages: torch.Tensor) -> None:
        """Copy the chosen pages into the reserve and wait for them (so the timing is the copy's)."""
        store = self.store
        copied = store.recall(pages)
        if store.device.type == "cuda":
            torch.cuda.current_stream(store.device).synchronize()
        self.stats.pages_recalled.append(copied)

    def _extend_chunk_keys(self) -> None:
        raise NotImplementedError

    def _key_tail_chunks(self) -> None:
        """Key the complete chunks still in the tail (before a prefetch); caches that prefetch implement it."""
        raise NotImplementedError

    def _choose_pages(self, by_rank: bool = False) -> torch.Tensor:
        """Page ids for the reserve's page slots, ``-1`` for an empty slot. # [B, K]

        With spare slots (prefetch) at most ``K - spare`` pages are chosen and the rest of the row is -1;
        ``by_rank`` returns them best first instead of sorted.
        """
        store = self.store
        if self.forced_pages is not None:
            pages = self.forced_pages(self).to(store.device)
            if self.spare_slots:
                pages = first_valid(pages, store.layout.num_page_slots - self.spare_slots)
            return pages
        k_all = store.layout.num_page_slots
        k = k_all - self.spare_slots
        selectable = self.selectable_pages()
        if k >= selectable:
            pages = torch.arange(k_all, device=store.device).expand(store.batch, -1)
            return torch.where(pages < selectable, pages, -1)
        scores = self._with_turn_scores(self._score_chunks())
        tower = self._tower_scores()
        valid = self._valid_chunks(scores.shape[1])
        in_sink = self._sink_chunks(scores.shape[1])
        if in_sink is not None:
            # the sink is resident anyway; models that dump attention on their first token would otherwise spend
            # a page slot on the page that starts with it
            scores = scores.masked_fill(in_sink, 0.0)
            tower = None if tower is None else tower.masked_fill(in_sink, 0.0)
        if self.lsa.follow_chunks:
            # padding must not lend its score to the first real chunks
            held = scores if valid is None else scores.masked_fill(~valid, 0.0)
            scores = follow_scores(held, self.lsa.follow_chunks)
        self.last_scores = scores
        self._record_kept(scores)
        pages = select_pages(
            scores,
            num_selectable=selectable,
            page_chunks=self.lsa.page_chunks,
            num_slots=k,
            threshold=self.lsa.threshold,
            valid_chunks=valid,
            top_m=math.ceil((self.lsa.best_chunk_slots if tower is None else self._tower_share()) * min(k, selectable)),
            by_rank=by_rank,
            best_scores=tower,
        )
        if k < k_all:
            pages = torch.nn.functional.pad(pages, (0, k_all - k), value=-1)
        return pages

    def _with_turn_scores(self, scores: torch.Tensor) -> torch.Tensor:
        """At a warm-up boundary, each chunk keeps the best of its score now and at the turn's first boundary.

        The query window has rolled past part of the question by then; without this, the pages the question
        pointed at would compete only on the answer's first tokens, and a needle found for the question would be
        dropped for text the answer merely resembles. At the turn's first boundary the scores are kept for that.
        """
        if self._at_warmup_step() and self.turn_scores is not None:
            n = min(scores.shape[1], self.turn_scores.shape[1])
            return torch.cat([torch.maximum(scores[:, :n], self.turn_scores[:, :n]), scores[:, n:]], 1)
        if self.turn_steps == 0 and self.lsa.warmup_steps:
            self.turn_scores = scores
        return scores

    def _score_chunks(self) -> torch.Tensor:
        """The indexer's probability per chunk for the coming cycle, on the store's device. # [B, N]"""
        raise NotImplementedError

    def _tower_share(self) -> float:
        """Share of page slots for the tower's best chunks when a feedback head scores: the config's, else the
        head's own."""
        if self.lsa.tower_slots is not None:
            return self.lsa.tower_slots
        return self.indexer.feedback_spec.tower_slots

    def _tower_scores(self) -> torch.Tensor | None:
        """The query tower's own probabilities of the latest :meth:`_score_chunks`, where a feedback head made
        the scores; they rank the ``tower_slots`` share of the pages. None otherwise. # [B, N]"""
        return None

    def _valid_chunks(self, n: int) -> torch.Tensor | None:
        """Chunks that hold real tokens ``[B, N]``; ``None`` when every chunk does."""
        return None

    def _sink_chunks(self, n: int) -> torch.Tensor | None:
        """Chunks that lie wholly in the always-resident sink ``[B, N]``; ``None`` when the backend has none."""
        return None

    def _record_kept(self, scores: torch.Tensor) -> None:
        self.stats.above_threshold.append(float((scores > self.lsa.threshold).float().mean()))

    def _keep_lookahead_hidden(self, layer: int, hidden: torch.Tensor) -> None:
        """Keep the newest ``query_window`` rows of ``hidden [B, q, ...]`` for ``layer``'s next lookahead query."""
        window = self.lsa.query_window
        # A copy, not a view: a view would keep the prompt's whole hidden-state tensor alive on the device.
        new = hidden[:, -window:].detach().clone()
        old = self.lookahead.get(layer)
        self.lookahead[layer] = (
            new if old is None or hidden.shape[1] >= window else torch.cat([old, new], 1)[:, -window:]
        )

    def device_kv_bytes(self) -> int:
        """Physical bytes of KV state on the device: reserves, chunk keys and the other layers' state."""
        tensors = [] if self.store is None else self.store.device_tensors()
        tensors += self.chunk_keys.device_tensors()
        tensors += self._other_device_tensors()
        return storage_bytes(tensors)

    def _other_device_tensors(self) -> list[torch.Tensor]:
        """Device tensors of the cache layers whose history is not in the store."""
        raise NotImplementedError

    def host_kv_bytes(self) -> int:
        return 0 if self.store is None else storage_bytes(self.store.host_tensors())
