"""A KV store whose per-step path and recall never wait for the host.

Differences from :class:`KVStore`:

- the bounds of the resident set (``sink_len``, ``lo``, ``tail_start``, ``seq_len``) and the slot of the newest
  token live in small device tensors updated in place, so a decode step reads them on the device and a CUDA
  graph that captured one step stays valid after later steps and boundaries;
- recall plans its moves on the device (which slot keeps its page, which page goes to which free slot) and, on
  CUDA with Triton, copies the incoming pages straight from the pinned mirror on a side stream; per-layer
  events let the compute stream wait for a layer's pages just before that layer attends;
- the tail flush at a boundary runs on the same side stream, through a pinned staging buffer, and the tail
  slides after it on the device. The flush is the one place the host waits: the boundary's chunk keys and
  recall read the flushed tokens from the mirror right after it.

Counts that only the device knows (pages copied per boundary) are kept as device tensors and read back by
:meth:`AsyncKVStore.sync_log` when the caller wants numbers.
"""

from __future__ import annotations

import importlib.util

import torch

from .resident import page_aligned_tail_start, resident_positions
from .store import KVStore


def plan_moves(old: torch.Tensor, new: torch.Tensor, *, empty_only: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Device-side diff of two page tables: keep what stays, put incoming pages into freed slots.

    Args:
        old: page id per slot now, -1 for empty. # [B, K]
        new: page ids wanted, distinct per row, -1 for unused entries (any order). # [B, W]
        empty_only: put incoming pages only into slots that are empty now, not into slots whose page leaves
            (a prefetch: attention still reads the leaving pages until the boundary). The caller guarantees
            enough empty slots.

    Returns:
        ``(table, moves)``: the new page id per slot, and the page to copy into each slot (-1 where the slot
        keeps its content or stays empty). # [B, K], [B, K]
    """
    b, k = old.shape
    device = old.device
    keep = ((old[:, :, None] == new[:, None, :]) & (old[:, :, None] >= 0)).any(-1)  # old slot keeps its page
    resident = ((new[:, :, None] == old[:, None, :]) & (new[:, :, None] >= 0)).any(-1)
    incoming = (new >= 0) & ~resident
    free = old < 0 if empty_only else ~keep
    free_rank = torch.cumsum(free.long(), 1) - 1
    in_rank = torch.cumsum(incoming.long(), 1) - 1
    slots = torch.arange(k, device=device).expand(b, -1)
    # the r-th free slot; column k collects the entries that are not free
    slot_of_rank = torch.full((b, k + 1), k, dtype=torch.long, device=device)
    slot_of_rank.scatter_(1, torch.where(free, free_rank, k), slots)
    target = torch.gather(slot_of_rank, 1, torch.where(incoming, in_rank, k))  # slot per incoming page
    moves = torch.full((b, k + 1), -1, dtype=torch.long, device=device)
    moves.scatter_(1, torch.where(incoming, target, k), torch.where(incoming, new, -1))
    moves = moves[:, :k].contiguous()
    table = torch.where(moves >= 0, moves, torch.where(keep, old, -1))
    return table, moves


def first_valid(pages: torch.Tensor, n: int | torch.Tensor) -> torch.Tensor:
    """``pages`` with every entry after the first ``n`` valid (``>= 0``) ones of a row set to -1. # [B, W]"""
    return torch.where(_beyond_first(pages >= 0, n), -1, pages)


def _beyond_first(mask: torch.Tensor, n: int | torch.Tensor) -> torch.Tensor:
    """The True entries of ``mask`` after the first ``n`` of their row. # [B, W]"""
    return mask & (torch.cumsum(mask.long(), 1) > n)


def limit_incoming(old: torch.Tensor, wanted: torch.Tensor, max_incoming: int, max_pages: int) -> torch.Tensor:
    """The pages a prefetch may bring: at most ``max_incoming`` new ones, ``max_pages`` in all.

    New pages beyond ``max_incoming`` are dropped in ``wanted``'s order (best first); the room they leave goes to
    resident pages that ``wanted`` did not name, which cost no copy.

    Args:
        old: page id per slot now, -1 for empty. # [B, K]
        wanted: page ids in order of preference, -1 for unused entries. # [B, W]
        max_incoming: most pages that are not resident now.
        max_pages: most pages in the result.

    Returns:
        Page ids to hold after the prefetch, -1 for unused entries. # [B, W + K]
    """
    valid = wanted >= 0
    resident = (wanted[:, :, None] == old[:, None, :]).any(-1) & valid
    wanted = torch.where(_beyond_first(valid & ~resident, max_incoming), -1, wanted)
    wanted = first_valid(wanted, max_pages)  # the pages kept so far, in preference order
    room = max_pages - (wanted >= 0).sum(1, keepdim=True)
    spare = (old >= 0) & ~(old[:, :, None] == wanted[:, None, :]).any(-1)
    return torch.cat([wanted, torch.where(spare & ~_beyond_first(spare, room), old, -1)], 1)


class AsyncKVStore(KVStore):
    """:class:`KVStore` with device-resident step state and host-sync-free recall (see the module docstring)."""

    def allocate(self, batch: int, num_heads: int, head_dim: int, **kwargs) -> None:
        super().allocate(batch, num_heads, head_dim, **kwargs)
        dev = self.device
        self.sink_len = torch.zeros(batch, dtype=torch.int32, device=dev)
        self.lo = torch.zeros(batch, dtype=torch.int32, device=dev)
        self.tail_start_dev = torch.zeros(batch, dtype=torch.int32, device=dev)
        self.seq_len_dev = torch.zeros(batch, dtype=torch.int32, device=dev)
        self.write_slot = torch.zeros(1, dtype=torch.long, device=dev)
        self.use_triton_copy = dev.type == "cuda" and importlib.util.find_spec("triton") is not None
        self.layer_events: dict[int, torch.cuda.Event] = {}
        self.prefetch_events: dict[int, torch.cuda.Event] = {}
        self._pending_counts: list[tuple[int, torch.Tensor]] = []
        self._moves: tuple[torch.Tensor, torch.Tensor | None] | None = None
        self._prefetched_table: torch.Tensor | None = None

    def refresh_positions(self) -> None:
        """Recompute every bound from the host counters (prefill and boundaries only; never inside a step)."""
        super().refresh_positions()
        pad = self.pad_len
        sink_end = torch.clamp(pad + self.layout.sink, max=self.tail_start)
        self.sink_len.copy_((sink_end - pad).clamp(min=0))
        self.lo.copy_(torch.maximum(sink_end, pad))
        self.tail_start_dev.fill_(self.tail_start)
        self.seq_len_dev.fill_(self.seq_len)
        self.write_slot.fill_(self.layout.tail_start + self.seq_len - 1 - self.tail_start)

    def begin_step(self) -> None:
        """Advance by one token: host counters for scheduling, device counters for the step's kernels."""
        self._check_tail_room()
        self.seq_len += 1
        self.step += 1
        self.seq_len_dev.add_(1)
        self.write_slot.add_(1)

    def advance_host(self) -> None:
        """Host half of :meth:`begin_step`, for a step whose device half a CUDA graph replays."""
        self.seq_len += 1
        self.step += 1

    def append(self, layer: int, keys: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        event = self.layer_events.pop(layer, None)
        if event is not None:
            # this layer's recalled pages were copied on the side stream: wait on the device, not the host
            torch.cuda.current_stream(self.device).wait_event(event)
        self.reserve_k[layer].index_copy_(2, self.write_slot, keys)
        self.reserve_v[layer].index_copy_(2, self.write_slot, values)
        return self.reserve_k[layer], self.reserve_v[layer]

    def attention_mask(self) -> torch.Tensor:
        # slot_pos is only refreshed at boundaries here; rebuild it for callers of the masked path
        pos = resident_positions(self.layout, self.page_table, self.pad_len, self.tail_start, self.seq_len)
        return (pos >= 0)[:, None, None, :]

    def reserve_tokens(self, layer: int, start: int, end: int) -> torch.Tensor:
        """Keys of positions ``[start, end)`` still held by the tail (before it slides). # [B, H, end-start, D]"""
        if start < self.tail_start or end > self.seq_len:
            raise ValueError(f"positions [{start}, {end}) are not all in the tail [{self.tail_start}, {self.seq_len})")
        t0 = self.layout.tail_start - self.tail_start
        return self.reserve_k[layer][:, :, t0 + start : t0 + end]

    def end_cycle(self) -> None:
        if self.device.type != "cuda":
            return super().end_cycle()
        new_start = page_aligned_tail_start(self.seq_len, self.recent, self.layout.page_size)
        shift = new_start - self.tail_start
        lo, hi = self.flushed_len, self.seq_len
        stream, current = self._copy_stream, torch.cuda.current_stream(self.device)
        if hi > self.capacity:
            stream.synchronize()  # growing re-allocates the mirror on the host: no copy may still target it
            self._ensure_capacity(hi)
        stream.wait_stream(current)
        pairs = self._flush_pairs(lo, hi)
        with torch.cuda.stream(stream):
            # Through a pinned staging buffer: one copy into the strided mirror slice would bounce through pageable
            # memory and hold the host longer (both forms return once the tokens are on the host).
            self._flush_writer.write(pairs, stream)
        self.log.d2h_bytes += 2 * len(self.layers) * self._token_bytes() * (hi - lo)
        if shift:
            current.wait_stream(stream)  # the slide overwrites tail slots the flush is still reading
            self._slide_tail(shift, new_start)
        self.flushed_len = hi
        self.tail_start = new_start
        self.refresh_positions()

    def recall(self, pages: torch.Tensor) -> int:
        """Make ``pages`` resident. Returns the number of pages copied, or -1 when only the device knows it yet.

        On CUDA with Triton nothing here waits for the host; :meth:`sync_log` reads the counts later.
        """
        if pages.shape != self.page_table.shape:
            raise ValueError(f"expected pages of shape {tuple(self.page_table.shape)}, got {tuple(pages.shape)}")
        if self.device.type == "cuda" and not self.use_triton_copy:
            table = self.page_table  # keep the tensor that kernels and graphs hold; the base class rebinds it
            copied = super().recall(pages)
            table.copy_(self.page_table)
            self.page_table = table
            self.refresh_positions()
            return copied
        table, moves = plan_moves(self.page_table, pages.to(self.device, torch.long))
        self._copy_moves(moves, self.layer_events)
        self.page_table.copy_(table)
        self.refresh_positions()
        return -1 if self.device.type == "cuda" else self.sync_log()[-1]

    def prefetch(self, wanted: torch.Tensor, max_incoming: int, max_pages: int) -> None:
        """Start copying the next cycle's pages into empty slots; they join the resident set at :meth:`commit_prefetch`.

        Attention keeps reading the current pages until then, so a prefetch only writes slots that are empty now.
        On CUDA the copy runs on the side stream and nothing waits for it before the commit.

        Args:
            wanted: page ids in order of preference, -1 for unused entries. # [B, W]
            max_incoming: most pages that are not resident now (at most the empty slots).
            max_pages: most pages resident after the commit.
        """
        if self._prefetched_table is not None:
            raise RuntimeError("a prefetch is already pending: commit_prefetch() must run first")
        old = self.page_table
        free = int(self.layout.num_page_slots - max_pages)
        if max_incoming > free:
            raise ValueError(f"max_incoming={max_incoming} exceeds the {free} slots a prefetch may fill")
        plan = limit_incoming(old, wanted.to(self.device, torch.long), max_incoming, max_pages)
        table, moves = plan_moves(old, plan, empty_only=True)
        # pages at or after the tail start are not in the mirror yet: they are copied from the reserve's tail
        first_tail_page = self.tail_start // self.layout.page_size
        in_tail = moves >= first_tail_page
        self._copy_moves(
            torch.where(in_tail, -1, moves), self.prefetch_events, torch.where(in_tail, moves - first_tail_page, -1)
        )
        self._prefetched_table = table

    @property
    def prefetch_pending(self) -> bool:
        return self._prefetched_table is not None

    def drop_prefetch(self) -> None:
        """Forget a pending prefetch: its slots stay empty for the next recall (which the side stream orders after
        the copies already started)."""
        if self.device.type == "cuda":
            for layer in list(self.prefetch_events):
                torch.cuda.current_stream(self.device).wait_event(self.prefetch_events.pop(layer))
        self._prefetched_table = None

    def commit_prefetch(self) -> None:
        """Make the prefetched pages resident and free the slots of the pages that left (a boundary's recall)."""
        if self._prefetched_table is None:
            raise RuntimeError("no prefetch to commit")
        current = torch.cuda.current_stream(self.device) if self.device.type == "cuda" else None
        for layer in list(self.prefetch_events):
            current.wait_event(self.prefetch_events.pop(layer))  # long done by now: the copy had the whole prefetch
        self.page_table.copy_(self._prefetched_table)
        self._prefetched_table = None
        self.refresh_positions()

    def _copy_moves(
        self, moves: torch.Tensor, events: dict[int, torch.cuda.Event], tail_moves: torch.Tensor | None = None
    ) -> None:
        """Copy mirror pages (``moves``) and, for a prefetch, tail pages (``tail_moves``, ids counted from the tail
        start) into their slots; only the mirror pages count as recalled (host-to-device) pages."""
        self._pending_counts.append((self.step, (moves >= 0).sum()))
        if self.device.type == "cuda" and self.use_triton_copy:
            self._copy_moves_async(moves, events, tail_moves)
            return
        self._copy_moves_host(moves)
        if tail_moves is not None:
            self._copy_moves_host(tail_moves, from_tail=True)

    def _copy_moves_host(self, moves: torch.Tensor, from_tail: bool = False) -> None:
        """Copy by indexing: from the mirror, or with ``from_tail`` from the reserve's own tail."""
        size, base = self.layout.page_size, self.layout.page_start
        rows, slots = (moves >= 0).nonzero(as_tuple=True)
        offsets = torch.arange(size, device=moves.device)
        src = (moves[rows, slots][:, None] * size + offsets).flatten()  # [M*P]
        if from_tail:
            src = src + self.layout.tail_start
        dst = (base + slots[:, None] * size + offsets).flatten()
        rows = rows.repeat_interleave(size)
        for layer in self.layers:
            for reserve, mirror in ((self.reserve_k, self.mirror_k), (self.reserve_v, self.mirror_v)):
                source = reserve[layer] if from_tail else mirror[layer]
                pages = source[rows.to(source.device), :, src.to(source.device)]
                reserve[layer][rows, :, dst] = pages.to(reserve[layer].device)

    def _copy_moves_async(
        self, moves: torch.Tensor, events: dict[int, torch.cuda.Event], tail_moves: torch.Tensor | None = None
    ) -> None:
        from .page_copy_triton import copy_pages

        stream, current = self._copy_stream, torch.cuda.current_stream(self.device)
        stream.wait_stream(current)  # moves are computed there, and evicted slots may still be read there
        moves = moves.contiguous()
        tail_moves = None if tail_moves is None else tail_moves.contiguous()
        self._moves = (moves, tail_moves)  # keep the move lists alive until the side stream has used them
        for m in self._moves:
            if m is not None:
                m.record_stream(stream)
        size, sink, tail = self.layout.page_size, self.layout.sink, self.layout.tail_start
        with torch.cuda.stream(stream):
            for layer in self.layers:
                for reserve, mirror in ((self.reserve_k, self.mirror_k), (self.reserve_v, self.mirror_v)):
                    copy_pages(mirror[layer], reserve[layer], moves, size, sink)
                    if tail_moves is not None:
                        # complete pages of the tail: the steps still to come before the boundary write after
                        # them, and the tail slides only after this stream's work (end_cycle waits for it)
                        copy_pages(reserve[layer][:, :, tail:], reserve[layer], tail_moves, size, sink)
                event = torch.cuda.Event()
                event.record(stream)
                events[layer] = event

    def sync_log(self) -> list[int]:
        """Read the pending per-boundary copy counts back into :attr:`log` (waits for them); returns all counts."""
        size = self.layout.page_size
        per_page = 2 * len(self.layers) * size * self._token_bytes() // self.batch
        for step, count in self._pending_counts:
            n = int(count)
            self.log.pages_recalled.append(n)
            self.log.h2d_bytes += n * per_page
            if n:
                self.log.copy_steps.append(step)
        self._pending_counts.clear()
        return self.log.pages_recalled

    def wait_recall(self) -> None:
        """Make the compute stream wait for every pending page copy (before reading the reserve directly)."""
        for layer in list(self.layer_events):
            torch.cuda.current_stream(self.device).wait_event(self.layer_events.pop(layer))
