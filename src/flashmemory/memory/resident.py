"""Which absolute token position each reserve slot holds; -1 marks a slot attention must skip."""

from __future__ import annotations

import torch

from .layout import ReserveLayout


def resident_positions(
    layout: ReserveLayout,
    page_table: torch.Tensor,
    pad_len: torch.Tensor,
    tail_start: int,
    seq_len: int,
) -> torch.Tensor:
    """Absolute position held by every slot of the reserve.

    Every position in ``[pad_len, seq_len)`` that is resident appears exactly once: pages never count tokens
    that the sink or the tail already hold, so attention over the valid slots equals attention over that set.

    Args:
        layout: reserve regions.
        page_table: page id per page slot, -1 when empty. # [B, K]
        pad_len: left-padding tokens per sequence. # [B]
        tail_start: first position of the recent tail (a multiple of the page size).
        seq_len: tokens written so far (padding included).

    Returns:
        Position per slot, -1 for slots that hold nothing valid. # [B, S]
    """
    device = page_table.device
    pad = pad_len.to(device).view(-1, 1)
    sink_end = torch.minimum(pad + layout.sink, torch.full_like(pad, tail_start))

    sink_pos = pad + torch.arange(layout.sink, device=device)
    sink_pos = torch.where(sink_pos < sink_end, sink_pos, -1)

    offsets = torch.arange(layout.page_size, device=device)
    page_pos = page_table.unsqueeze(-1) * layout.page_size + offsets  # [B, K, P]
    page_ok = (page_table.unsqueeze(-1) >= 0) & (page_pos >= sink_end.unsqueeze(-1)) & (page_pos < tail_start)
    page_pos = torch.where(page_ok, page_pos, -1).flatten(1)

    tail_pos = tail_start + torch.arange(layout.tail_capacity, device=device).expand(pad.shape[0], -1)
    tail_ok = (tail_pos < seq_len) & (tail_pos >= torch.maximum(sink_end, pad))
    tail_pos = torch.where(tail_ok, tail_pos, -1)
    return torch.cat([sink_pos, page_pos, tail_pos], dim=1)


def page_aligned_tail_start(seq_len: int, recent: int, page_size: int) -> int:
    """First tail position: at least ``recent`` tokens before ``seq_len``, rounded down to a page boundary."""
    return max(0, (seq_len - recent) // page_size * page_size)
