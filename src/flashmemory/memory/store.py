"""KV memory store: the whole history in a host mirror, a fixed-size device reserve per layer, a page table.

Layout per LSA-managed layer::

    host mirror   [B, H, T_cap, D]   every token, pinned when CUDA is present
    device reserve [B, H, S, D]      [sink | K page slots | recent tail], S fixed for the request

The page table and the slot positions are shared by all layers: a sequence keeps the same pages resident in
every layer. Copies between host and device happen only in :meth:`KVStore.recall` and
:meth:`KVStore.end_cycle`, i.e. at cycle boundaries.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass, field

import torch

from .host_rows import StagedWriter, copy_to_host_slice
from .layout import ReserveLayout
from .pinned import HOST_POOL, HostBlock, block_bytes
from .resident import page_aligned_tail_start, resident_positions


@dataclass(slots=True)
class TransferLog:
    """Host/device traffic, for accounting and for tests that pin down when copies happen."""

    pages_recalled: list[int] = field(default_factory=list)
    h2d_bytes: int = 0
    d2h_bytes: int = 0
    copy_steps: list[int] = field(default_factory=list)


@dataclass(eq=False)
class PrefilledMirror:
    """Host tensors that already hold a prompt's first ``length`` tokens, lent to one store as its mirror.

    A context captured once (a session's) keeps each full-attention layer's keys and values in host tensors with
    room after them; a store that adopts them writes only the tokens after ``length``, and holds no mirror of its
    own. The lender knows it is free again once this object is gone.

    Attributes:
        keys: per managed layer, ``[B, H, capacity, D]`` host tensors whose first ``length`` tokens are filled.
        values: the same for values.
        length: tokens already in place.
        owner: what the tensors belong to, kept alive while the store uses them.
    """

    keys: dict[int, torch.Tensor] = field(repr=False)
    values: dict[int, torch.Tensor] = field(repr=False)
    length: int
    owner: object = field(default=None, repr=False)


class KVStore:
    """Host mirror + device reserve for the LSA-managed layers of one batch of sequences.

    Args:
        layers: indices of the decoder layers the store manages.
        layout: reserve regions.
        recent: tokens the tail keeps at every boundary.
    """

    def __init__(self, layers: list[int], layout: ReserveLayout, recent: int) -> None:
        self.layers = list(layers)
        self.layout = layout
        self.recent = recent
        self.mirror_k: dict[int, torch.Tensor] = {}
        self.mirror_v: dict[int, torch.Tensor] = {}
        self.reserve_k: dict[int, torch.Tensor] = {}
        self.reserve_v: dict[int, torch.Tensor] = {}
        self.page_table: torch.Tensor | None = None  # [B, K] on the device
        self.slot_pos: torch.Tensor | None = None  # [B, S] on the device
        self.pad_len: torch.Tensor | None = None  # [B]
        self.seq_len = 0
        self.tail_start = 0
        self.flushed_len = 0
        self.step = 0
        self.log = TransferLog()
        self._copy_stream = None
        self._flush_writer = StagedWriter()
        self._mirror_block: HostBlock | None = None
        self._prefilled: PrefilledMirror | None = None  # the mirror lent by a captured context, if adopted
        self._in_place = 0  # leading tokens of the mirror that the prefill need not write (already there)

    def allocate(
        self,
        batch: int,
        num_heads: int,
        head_dim: int,
        *,
        dtype: torch.dtype,
        device: torch.device,
        capacity: int,
        pad_len: torch.Tensor,
        prefilled: PrefilledMirror | None = None,
    ) -> None:
        """Create the mirror (``capacity`` tokens) and the reserve; called once before prefill writes.

        With ``prefilled`` (holding at least ``capacity`` tokens per row) the store uses those host tensors as its
        mirror and the prefill writes only the tokens after the ones already there.
        """
        self.device = torch.device(device)
        pin = self.device.type == "cuda"
        mirror_shape = (batch, num_heads, capacity, head_dim)
        reserve_shape = (batch, num_heads, self.layout.num_slots, head_dim)
        if prefilled is not None:
            self._adopt(prefilled, mirror_shape, dtype)
        else:
            self.set_mirrors(mirror_shape, mirror_shape, dtype)
        for layer in self.layers:
            for reserve in (self.reserve_k, self.reserve_v):
                reserve[layer] = torch.zeros(reserve_shape, dtype=dtype, device=self.device)
        self.page_table = torch.full((batch, self.layout.num_page_slots), -1, dtype=torch.long, device=self.device)
        self.pad_len = pad_len.to(self.device, torch.long)
        if pin:
            self._copy_stream = torch.cuda.Stream(self.device)

    def set_mirrors(self, k_shape: tuple[int, ...], v_shape: tuple[int, ...], dtype: torch.dtype) -> None:
        """Give every layer new, uninitialised host mirrors of these shapes, replacing any it had.

        On CUDA they are views of one page-locked block leased from :data:`~flashmemory.memory.pinned.HOST_POOL`,
        which the store holds while it lives; elsewhere ordinary host tensors.
        """
        shapes = [k_shape] * len(self.layers) + [v_shape] * len(self.layers)
        tensors = self._host_tensors(shapes, dtype)
        for i, layer in enumerate(self.layers):
            self.mirror_k[layer] = tensors[i]
            self.mirror_v[layer] = tensors[len(self.layers) + i]

    def _adopt(self, prefilled: PrefilledMirror, shape: tuple[int, ...], dtype: torch.dtype) -> None:
        for layer in self.layers:
            for t in (prefilled.keys[layer], prefilled.values[layer]):
                if (t.shape[:2], t.shape[3], t.dtype) != (shape[:2], shape[3], dtype) or t.shape[2] < shape[2]:
                    raise ValueError(
                        f"a prefilled mirror of shape {tuple(t.shape)} ({t.dtype}) cannot hold {shape} ({dtype})"
                    )
            self.mirror_k[layer], self.mirror_v[layer] = prefilled.keys[layer], prefilled.values[layer]
        self._prefilled, self._in_place = prefilled, prefilled.length

    def _host_tensors(self, shapes: list[tuple[int, ...]], dtype: torch.dtype) -> list[torch.Tensor]:
        """Host tensors for the mirror, leasing their block and giving back the one the store held before."""
        old, self._mirror_block = self._mirror_block, None
        if self.device.type == "cuda":
            self._mirror_block = HOST_POOL.lease(block_bytes(shapes, dtype), self.device)
            tensors = self._mirror_block.tensors(shapes, dtype)
        else:
            tensors = [torch.empty(s, dtype=dtype) for s in shapes]
        if old is not None:
            old.release()
        return tensors

    def wait_mirror(self) -> None:
        """Block the host until every copy into the host mirror has landed, before the host reads the mirror.

        The prefill's copies are queued on the compute stream; an asynchronous store flushes a cycle's tokens on
        its copy stream.
        """
        if self.device.type != "cuda":
            return
        torch.cuda.current_stream(self.device).synchronize()
        if self._copy_stream is not None:
            self._copy_stream.synchronize()

    @property
    def batch(self) -> int:
        return 0 if self.page_table is None else self.page_table.shape[0]

    @property
    def capacity(self) -> int:
        return next(iter(self.mirror_k.values())).shape[2]

    def write_prefill(self, layer: int, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Store a prefilled layer: all tokens to the mirror, sink and tail straight into the reserve.

        Args:
            keys: post-RoPE keys of the prompt. # [B, H, T, D]
            values: values of the prompt. # [B, H, T, D]
        """
        seq_len = keys.shape[2]
        self._ensure_capacity(seq_len)
        start = min(self._in_place, seq_len)
        copy_to_host_slice(keys[:, :, start:], self.mirror_k[layer][:, :, start:seq_len])
        copy_to_host_slice(values[:, :, start:], self.mirror_v[layer][:, :, start:seq_len])
        self.log.d2h_bytes += 2 * keys[:, :, start:].numel() * keys.element_size()
        if layer == self.layers[0]:
            self.seq_len = self.flushed_len = seq_len
            self.tail_start = page_aligned_tail_start(seq_len, self.recent, self.layout.page_size)
        self._fill_sink(layer, keys, values)
        self._fill_tail(layer, keys, values)

    def _fill_sink(self, layer: int, keys: torch.Tensor, values: torch.Tensor) -> None:
        lay = self.layout
        if lay.sink == 0:
            return
        idx = (self.pad_len.view(-1, 1) + torch.arange(lay.sink, device=self.device)).clamp(max=keys.shape[2] - 1)
        idx = idx.to(keys.device)[:, None, :, None].expand(-1, keys.shape[1], -1, keys.shape[3])
        self.reserve_k[layer][:, :, : lay.sink] = keys.gather(2, idx)
        self.reserve_v[layer][:, :, : lay.sink] = values.gather(2, idx)

    def _fill_tail(self, layer: int, keys: torch.Tensor, values: torch.Tensor) -> None:
        start, n = self.layout.tail_start, self.seq_len - self.tail_start
        self.reserve_k[layer][:, :, start : start + n] = keys[:, :, self.tail_start : self.seq_len]
        self.reserve_v[layer][:, :, start : start + n] = values[:, :, self.tail_start : self.seq_len]

    def _check_tail_room(self) -> None:
        if self.seq_len - self.tail_start >= self.layout.tail_capacity:
            raise RuntimeError(
                "recent tail overflow: end_cycle() must run every `interval` steps, and a cache decodes at most "
                "the max_new_tokens it was built for (its tail holds no more)"
            )

    def begin_step(self) -> None:
        """Account for the token the coming decode step writes (same slot in every layer)."""
        self._check_tail_room()
        self.seq_len += 1
        self.step += 1
        self.refresh_positions()

    def append(self, layer: int, keys: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write one decode token into the tail and return the whole reserve of the layer.

        Args:
            keys: the new token's post-RoPE keys. # [B, H, 1, D]
            values: its values. # [B, H, 1, D]

        Returns:
            The layer's reserve keys and values, ready for attention under :attr:`slot_pos`. # [B, H, S, D]
        """
        slot = self.layout.tail_start + (self.seq_len - 1 - self.tail_start)
        self.reserve_k[layer][:, :, slot : slot + 1] = keys
        self.reserve_v[layer][:, :, slot : slot + 1] = values
        return self.reserve_k[layer], self.reserve_v[layer]

    def end_cycle(self) -> None:
        """Cycle boundary: flush the cycle's tokens to the mirror and slide the tail to its new page start."""
        new_start = page_aligned_tail_start(self.seq_len, self.recent, self.layout.page_size)
        shift = new_start - self.tail_start
        lo, hi = self.flushed_len, self.seq_len
        self._ensure_capacity(hi)
        pairs = self._flush_pairs(lo, hi)
        if self.device.type == "cuda":
            # staged: the tail slide below must not overwrite slots before they are copied, and the host reads
            # the flushed tokens next (new chunk keys); the writer returns once they have landed
            self._flush_writer.write(pairs)
        else:
            for src, out in pairs:
                out.copy_(src)
        if shift:
            self._slide_tail(shift, new_start)
        self.log.d2h_bytes += 2 * len(self.layers) * self._token_bytes() * (hi - lo)
        self.flushed_len = hi
        self.tail_start = new_start
        self.refresh_positions()

    def _flush_pairs(self, lo: int, hi: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """``(tail slice, mirror slice)`` of tokens ``lo..hi`` for every layer's keys and values."""
        a = self.layout.tail_start + lo - self.tail_start
        b = a + (hi - lo)
        return [
            (reserve[layer][:, :, a:b], mirror[layer][:, :, lo:hi])
            for layer in self.layers
            for reserve, mirror in ((self.reserve_k, self.mirror_k), (self.reserve_v, self.mirror_v))
        ]

    def _slide_tail(self, shift: int, new_start: int) -> None:
        """Move the tail's kept tokens ``shift`` slots towards its start, as the tail now begins at ``new_start``."""
        t0, kept = self.layout.tail_start, self.seq_len - new_start
        for layer in self.layers:
            for res in (self.reserve_k[layer], self.reserve_v[layer]):
                res[:, :, t0 : t0 + kept] = res[:, :, t0 + shift : t0 + shift + kept].clone()

    def selectable_pages(self) -> int:
        """Pages wholly before the tail: complete in the mirror, so they may be recalled."""
        return self.tail_start // self.layout.page_size

    def selectable_pages_ahead(self, steps: int) -> int:
        """Pages that will be wholly before the tail after ``steps`` more tokens, and are wholly written now.

        The pages between the current and that future tail start are still in the reserve's tail, not yet in the
        mirror; a prefetch copies them from there.
        """
        size = self.layout.page_size
        future = page_aligned_tail_start(self.seq_len + steps, self.recent, size)
        return min(future, self.seq_len) // size

    def recall(self, pages: torch.Tensor) -> int:
        """Make ``pages`` resident, copying only pages that were not already in a slot.

        Args:
            pages: page ids to keep per sequence, -1 for an unused slot; each row holds distinct ids. # [B, K]

        Returns:
            Number of pages copied from the host mirror.
        """
        if pages.shape != self.page_table.shape:
            raise ValueError(f"expected pages of shape {tuple(self.page_table.shape)}, got {tuple(pages.shape)}")
        old = self.page_table.cpu()
        new = pages.cpu()
        table = old.clone()
        moves: list[tuple[int, int, int]] = []  # (sequence, slot, page)
        for b in range(old.shape[0]):
            want = {int(p) for p in new[b] if p >= 0}
            keep = {int(p) for p in old[b] if p >= 0} & want
            free = [s for s in range(old.shape[1]) if int(old[b, s]) not in keep]
            incoming = sorted(want - keep)
            for s in free:
                table[b, s] = -1
            for s, page in zip(free, incoming, strict=False):
                table[b, s] = page
                moves.append((b, s, page))
        self._copy_pages(moves)
        self.page_table = table.to(self.device)
        self.log.pages_recalled.append(len(moves))
        if moves:
            self.log.copy_steps.append(self.step)
        self.refresh_positions()
        return len(moves)

    def _copy_pages(self, moves: list[tuple[int, int, int]]) -> None:
        if not moves:
            return
        size, base = self.layout.page_size, self.layout.page_start
        stream = self._copy_stream
        if stream is not None:
            # An evicted slot may still be read by attention queued on the compute stream.
            stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream) if stream is not None else nullcontext():
            for layer in self.layers:
                for reserve, mirror in ((self.reserve_k, self.mirror_k), (self.reserve_v, self.mirror_v)):
                    for b, slot, page in moves:
                        dst = reserve[layer][b, :, base + slot * size : base + (slot + 1) * size]
                        dst.copy_(mirror[layer][b, :, page * size : (page + 1) * size], non_blocking=True)
        if stream is not None:
            torch.cuda.current_stream(self.device).wait_stream(stream)
        self.log.h2d_bytes += 2 * len(self.layers) * len(moves) * size * self._token_bytes() // self.batch

    def refresh_positions(self) -> None:
        self.slot_pos = resident_positions(self.layout, self.page_table, self.pad_len, self.tail_start, self.seq_len)

    def attention_mask(self) -> torch.Tensor:
        """Boolean mask of the slots a decode query may attend to. # [B, 1, 1, S]"""
        return (self.slot_pos >= 0)[:, None, None, :]

    def _token_bytes(self) -> int:
        k = self.reserve_k[self.layers[0]]
        return k.shape[0] * k.shape[1] * k.shape[3] * k.element_size()

    def _ensure_capacity(self, needed: int) -> None:
        if needed <= self.capacity:
            return
        new_cap = max(needed, 2 * self.capacity)
        self.wait_mirror()  # the old mirror's last writes may still be in flight
        mirrors = [(m, layer) for m in (self.mirror_k, self.mirror_v) for layer in self.layers]
        old = [m[layer] for m, layer in mirrors]
        keep = self._mirror_block  # the old views stay valid until they are copied
        self._mirror_block = None
        shapes = [(*t.shape[:2], new_cap, t.shape[3]) for t in old]
        for (m, layer), src, dst in zip(mirrors, old, self._host_tensors(shapes, old[0].dtype), strict=True):
            dst[:, :, : src.shape[2]].copy_(src)
            m[layer] = dst
        if keep is not None:
            keep.release()
        self._prefilled = None  # a lent mirror is copied and given back

    def device_tensors(self) -> list[torch.Tensor]:
        """Every tensor the store keeps on the device (for physical byte counts)."""
        return [*self.reserve_k.values(), *self.reserve_v.values()]

    def host_tensors(self) -> list[torch.Tensor]:
        return [*self.mirror_k.values(), *self.mirror_v.values()]
