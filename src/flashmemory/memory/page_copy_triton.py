"""Triton copy of recalled pages from the pinned host mirror into the device reserve, driven by a device move list.

The host never learns which pages move: each program walks a share of the page slots, reads each slot's entry of
the move list and, when a page is due, streams that page of every KV head straight out of pinned host memory
(mapped into the device's address space under unified addressing) into the reserve slot. So recall needs no host
synchronisation and can be enqueued on a side stream or captured in a CUDA graph.

Imported lazily; only used on CUDA with Triton installed.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# Recall streams through PCIe at ~50 GB/s, far below what one SM can issue. A grid with one program per page and
# head would take every SM for the whole copy, so decode kernels queued on the compute stream could not start
# until it drained: the "side stream" would run serially. A few programs that loop over the slots keep PCIe busy
# and leave the rest of the device to the steps.
DEFAULT_PROGRAMS = 16


@triton.jit
def page_copy_kernel(
    src,
    dst,
    moves,
    stride_sb,
    stride_sh,
    stride_db,
    stride_dh,
    num_slots,
    num_pages,
    num_heads,
    page_start,
    num_programs,
    iterations,
    PAGE_ELEMS: tl.constexpr,
    BLOCK: tl.constexpr,
):
    i_p = tl.program_id(0)
    o = tl.arange(0, BLOCK)
    for j in tl.range(0, iterations):
        i_bk = i_p + j * num_programs
        page = tl.load(moves + i_bk, mask=i_bk < num_slots, other=-1).to(tl.int64)
        if page >= 0:
            i_b = (i_bk // num_pages).to(tl.int64)
            i_k = (i_bk % num_pages).to(tl.int64)
            for i_h in tl.range(0, num_heads):
                p_src = src + i_b * stride_sb + i_h * stride_sh + page * PAGE_ELEMS
                p_dst = dst + i_b * stride_db + i_h * stride_dh + page_start + i_k * PAGE_ELEMS
                for c in tl.static_range(0, PAGE_ELEMS, BLOCK):
                    m = c + o < PAGE_ELEMS
                    tl.store(p_dst + c + o, tl.load(p_src + c + o, mask=m), mask=m)


def copy_pages(
    mirror: torch.Tensor,
    reserve: torch.Tensor,
    moves: torch.Tensor,
    page_size: int,
    sink: int,
    programs: int = DEFAULT_PROGRAMS,
) -> None:
    """Copy ``mirror`` pages into ``reserve`` page slots where ``moves`` names a page.

    Args:
        mirror: pinned host keys or values, pages contiguous per head. # [B, H, T_cap, D]
        reserve: device reserve, pages contiguous per head. # [B, H, S, D]
        moves: page id to copy into each page slot, -1 for none (on the device). # [B, K]
        page_size: tokens per page.
        sink: sink slots before the first page slot.
        programs: most programs (thread blocks) the copy occupies; each loops over page slots. Default: 16.
    """
    if programs < 1:
        raise ValueError(f"programs must be >= 1, got {programs}")
    b, h, _, d = reserve.shape
    # a page of one head must be one contiguous run in both; batch and head strides are free (even 0)
    assert mirror.stride(3) == reserve.stride(3) == 1 and mirror.stride(2) == reserve.stride(2) == d
    moves = moves.contiguous()
    page_elems = page_size * d
    num_slots = b * moves.shape[1]
    if num_slots == 0:
        return
    grid = min(programs, num_slots)
    page_copy_kernel[(grid,)](
        mirror,
        reserve,
        moves,
        mirror.stride(0),
        mirror.stride(1),
        reserve.stride(0),
        reserve.stride(1),
        num_slots,
        moves.shape[1],
        h,
        sink * d,
        grid,
        triton.cdiv(num_slots, grid),
        PAGE_ELEMS=page_elems,
        BLOCK=min(4096, triton.next_power_of_2(page_elems)),
        num_warps=8,
    )
