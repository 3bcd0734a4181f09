"""The KV store of DeepSeek-V4's CSA layers: a "token" is one compressed entry, keys are values.

:class:`flashmemory.memory.KVStore` keeps a key and a value stream per layer. CSA attention reads one tensor as
both key and value, so the value stream is free: here it holds the lightning indexer's key of the same entry.
Both streams share slots, pages and the page table, so an entry's attention row and its indexer key are always
resident together. Per layer::

    host mirror     K: [B, 1, N_cap, D]   V: [B, 1, N_cap, D_idx]   every entry
    device reserve  K: [B, 1, S, D]       V: [B, 1, S, D_idx]       [sink | K page slots | recent tail]

Attention and the lightning indexer get the resident entries in ascending entry order, cut to the largest
resident count of the batch (:meth:`resident`): the native indexer masks entries it takes for the future by their
*index* in the tensor it is given, which is safe only when resident entries come first and in order; and with
every entry resident the tensor is then the very one transformers' own cache would hand over, so even ties in the
top-k break the same way. The count is tracked on the host (no device sync between boundaries).
"""

from __future__ import annotations

import torch

from ..memory.layout import ReserveLayout
from ..memory.resident import resident_positions
from ..memory.store import KVStore

_NOWHERE = torch.iinfo(torch.long).max


class EntryStore(KVStore):
    """Host mirror + device reserve of CSA entries and their indexer keys.

    Args:
        layers: CSA layer indices.
        layout: reserve regions, in entries.
        recent: entries the tail keeps at every boundary.
        layer_devices: device of each layer's reserve (layers may sit on different GPUs).
    """

    def __init__(
        self, layers: list[int], layout: ReserveLayout, recent: int, layer_devices: dict[int, torch.device]
    ) -> None:
        super().__init__(layers, layout, recent)
        self.layer_devices = dict(layer_devices)
        self.order: torch.Tensor | None = None  # [B, S] slot of the i-th resident entry, invalid slots last
        self.order_valid: torch.Tensor | None = None  # [B, S]
        self.num_resident = 0  # most resident entries of any sequence: the length of what :meth:`resident` returns
        self.page_table_host: torch.Tensor | None = None  # [B, K], a host copy refreshed at recall
        self._on_device: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    def allocate_entries(
        self,
        batch: int,
        widths: tuple[int, int],
        *,
        dtype: torch.dtype,
        device: torch.device,
        capacity: int,
    ) -> None:
        """Create mirrors and reserves; ``widths`` = (attention entry width, indexer key width)."""
        self.allocate(batch, 1, 1, dtype=dtype, device=device, capacity=capacity, pad_len=torch.zeros(batch))
        self.set_mirrors((batch, 1, capacity, widths[0]), (batch, 1, capacity, widths[1]), dtype)
        for stream, width in ((0, widths[0]), (1, widths[1])):
            reserves = self.reserve_k if stream == 0 else self.reserve_v
            for layer in self.layers:
                reserves[layer] = torch.zeros(
                    (batch, 1, self.layout.num_slots, width), dtype=dtype, device=self.layer_devices[layer]
                )
        self.page_table_host = torch.full((batch, self.layout.num_page_slots), -1, dtype=torch.long)

    def recall(self, pages: torch.Tensor) -> int:
        copied = super().recall(pages)
        self.page_table_host = self.page_table.cpu()  # recall has synchronised already
        self.refresh_positions()
        return copied

    def _fill_sink(self, layer: int, keys: torch.Tensor, values: torch.Tensor) -> None:
        n = min(self.layout.sink, keys.shape[2])
        self.reserve_k[layer][:, :, :n] = keys[:, :, :n]
        self.reserve_v[layer][:, :, :n] = values[:, :, :n]

    def append_entry(self, layer: int, stream: int, entry: torch.Tensor) -> None:
        """Write the newest entry (made resident by :meth:`begin_step`) of one stream into the tail.

        Args:
            stream: 0 for the attention entry, 1 for the indexer key.
            entry: the new entry. # [B, 1, width]
        """
        slot = self.layout.tail_start + (self.seq_len - 1 - self.tail_start)
        reserve = (self.reserve_k if stream == 0 else self.reserve_v)[layer]
        reserve[:, 0, slot : slot + 1] = entry

    def refresh_positions(self) -> None:
        super().refresh_positions()
        key = torch.where(self.slot_pos >= 0, self.slot_pos, _NOWHERE)
        sorted_key, self.order = key.sort(dim=1, stable=True)
        self.order_valid = sorted_key != _NOWHERE
        if self.page_table_host is not None:
            zeros = torch.zeros(self.batch, dtype=torch.long)
            host = resident_positions(self.layout, self.page_table_host, zeros, self.tail_start, self.seq_len)
            self.num_resident = int((host >= 0).sum(1).max())
        self._on_device.clear()

    def order_on(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """:attr:`order` and :attr:`order_valid` cut to :attr:`num_resident`, on ``device``. # 2 x [B, R]"""
        device = torch.device(device)
        if device not in self._on_device:
            n = self.num_resident
            self._on_device[device] = (self.order[:, :n].to(device), self.order_valid[:, :n].to(device))
        return self._on_device[device]

    def resident(self, layer: int, stream: int) -> torch.Tensor:
        """The layer's resident entries of one stream in ascending entry order, unused slots last.

        Returns:
            Entries; in a sequence with fewer resident entries than others, the rows past its count hold stale
            data that the caller must mask with :meth:`order_on`. # [B, R, width]
        """
        reserve = (self.reserve_k if stream == 0 else self.reserve_v)[layer][:, 0]
        order, _ = self.order_on(reserve.device)
        return reserve.gather(1, order[..., None].expand(-1, -1, reserve.shape[-1]))

    def resident_entries(self) -> torch.Tensor:
        """Entry id of each position of :meth:`resident`, -1 past a sequence's resident count. # [B, R]"""
        order, valid = self.order[:, : self.num_resident], self.order_valid[:, : self.num_resident]
        return torch.where(valid, self.slot_pos.gather(1, order), -1)

    def _token_bytes(self) -> int:
        k, v = self.reserve_k[self.layers[0]], self.reserve_v[self.layers[0]]
        return k.shape[0] * (k.shape[3] + v.shape[3]) * k.element_size() // 2
