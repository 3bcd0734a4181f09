"""Paged sparse decode attention over an LSA reserve: the resident-set description and the torch reference.

A reserve holds, per sequence and KV head, ``S = sink + K * page_size + tail_cap`` slots laid out as
``[sink | K page slots | recent tail]``. Which absolute position a slot holds follows from a few small
per-sequence tensors (:class:`ResidentSet`), so a kernel can walk the reserve page by page through the page
table, skipping empty slots, without ever building a gathered copy of the resident keys.

Validity of a slot (all bounds per sequence ``b``):

- sink slot ``i``: valid when ``i < sink_len[b]``;
- page slot ``k``, offset ``j``: position ``page_table[b, k] * page_size + j``; valid when the page id is
  ``>= 0`` and ``lo[b] <= position < tail_start[b]``;
- tail slot ``j``: position ``tail_start[b] + j``; valid when ``lo[b] <= position < seq_len[b]``.

``lo`` is the first position pages and tail may hold: the end of the sink (so no token counts twice) and
never inside left padding.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(slots=True)
class ResidentSet:
    """What the reserve of every sequence holds during one decode step (all tensors on the reserve's device).

    The tensors are updated in place between steps, so a CUDA graph that captured a step keeps reading the
    current values.

    Args:
        page_table: page id held by each page slot, -1 for an empty slot. # [B, K]
        sink_len: valid sink slots (a prefix of the sink region). # [B] int32
        lo: first absolute position that page and tail slots may hold. # [B] int32
        tail_start: absolute position of the first tail slot. # [B] int32
        seq_len: tokens written so far, the newest included (padding included). # [B] int32
        sink: sink slots of the layout (``>= 0``).
        page_size: tokens per page.
    """

    page_table: torch.Tensor
    sink_len: torch.Tensor
    lo: torch.Tensor
    tail_start: torch.Tensor
    seq_len: torch.Tensor
    sink: int
    page_size: int

    @property
    def num_pages(self) -> int:
        return self.page_table.shape[1]

    def tail_capacity(self, num_slots: int) -> int:
        return num_slots - self.sink - self.num_pages * self.page_size

    def slot_positions(self, num_slots: int) -> torch.Tensor:
        """Absolute position of every slot, -1 where the slot must be skipped. # [B, S]"""
        device = self.page_table.device
        batch = self.page_table.shape[0]
        col = lambda t: t.to(device, torch.long).view(-1, 1)  # noqa: E731
        sink_len, lo, tail_start, seq_len = col(self.sink_len), col(self.lo), col(self.tail_start), col(self.seq_len)
        # sink slots carry no position of their own; any value >= 0 marks them valid
        sink_idx = torch.arange(self.sink, device=device).expand(batch, -1)
        sink_pos = torch.where(sink_idx < sink_len, sink_idx, -1)
        offsets = torch.arange(self.page_size, device=device)
        table = self.page_table.to(torch.long).unsqueeze(-1)
        page_pos = table * self.page_size + offsets  # [B, K, P]
        lo3, ts3 = lo.unsqueeze(-1), tail_start.unsqueeze(-1)
        page_ok = (table >= 0) & (page_pos >= lo3) & (page_pos < ts3)
        page_pos = torch.where(page_ok, page_pos, -1).flatten(1)
        tail_pos = tail_start + torch.arange(self.tail_capacity(num_slots), device=device)
        tail_pos = torch.where((tail_pos >= lo) & (tail_pos < seq_len), tail_pos, -1)
        return torch.cat([sink_pos, page_pos, tail_pos], dim=1)


def check_sparse_decode_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rs: ResidentSet) -> None:
    """Raise ``ValueError`` for inputs the sparse decode op cannot take."""
    if q.dim() != 3 or k.dim() != 4 or v.shape != k.shape:
        raise ValueError(f"expected q [B, Hq, D] and k, v [B, Hkv, S, D]; got {tuple(q.shape)}, {tuple(k.shape)}")
    b, hq, d = q.shape
    if k.shape[0] != b or k.shape[3] != d:
        raise ValueError(f"q {tuple(q.shape)} and k {tuple(k.shape)} disagree on batch or head size")
    if hq % k.shape[1]:
        raise ValueError(f"query heads ({hq}) must be a multiple of KV heads ({k.shape[1]})")
    if rs.page_table.shape[0] != b:
        raise ValueError(f"page table has {rs.page_table.shape[0]} rows for a batch of {b}")
    if rs.tail_capacity(k.shape[2]) < 1:
        raise ValueError(f"reserve of {k.shape[2]} slots has no room for a tail after sink and pages")
    for name in ("sink_len", "lo", "tail_start", "seq_len"):
        if getattr(rs, name).shape != (b,):
            raise ValueError(f"ResidentSet.{name} must have shape ({b},), got {tuple(getattr(rs, name).shape)}")


def naive_sparse_decode(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rs: ResidentSet, scale: float | None = None
) -> torch.Tensor:
    """Reference: fp32 softmax attention of one decode query over the valid slots of the reserve.

    Args:
        q: query of the newest token. # [B, Hq, D]
        k: reserve keys. # [B, Hkv, S, D]
        v: reserve values. # [B, Hkv, S, D]
        rs: what the reserve holds.
        scale: logit scale. Default: ``D ** -0.5``.

    Returns:
        Attention output in the dtype of ``q``. # [B, Hq, D]
    """
    check_sparse_decode_inputs(q, k, v, rs)
    b, hq, d = q.shape
    group = hq // k.shape[1]
    scale = d**-0.5 if scale is None else scale
    valid = rs.slot_positions(k.shape[2]) >= 0  # [B, S]
    kf = k.float().repeat_interleave(group, dim=1)  # [B, Hq, S, D]
    vf = v.float().repeat_interleave(group, dim=1)
    logits = torch.einsum("bhd,bhsd->bhs", q.float(), kf) * scale
    logits = logits.masked_fill(~valid[:, None, :], float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    return torch.einsum("bhs,bhsd->bhd", probs, vf).to(q.dtype)
