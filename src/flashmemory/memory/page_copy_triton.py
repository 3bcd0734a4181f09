"""Triton copy of recalled pages from the pinned host mirror into the device reserve, driven by a device move list.

The host never learns which pages move: each program reads its slot's entry of the move list and, when a page is
due, streams that page of one KV head straight out of pinned host memory (mapped into the device's address
space under unified addressing) into the reserve slot. So recall needs no host synchronisation and can be
enqueued on a side stream or captured in a CUDA graph.

Imported lazily; only used on CUDA with Triton installed.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def page_copy_kernel(
    src,
    dst,
    moves,
    stride_sb,
    stride_sh,
    stride_db,
    stride_dh,
    num_pages,
    page_start,
    PAGE_ELEMS: tl.constexpr,
    BLOCK: tl.constexpr,
):
    i_bk = tl.program_id(0)
    i_h = tl.program_id(1).to(tl.int64)
    i_c = tl.program_id(2)
    i_b = (i_bk // num_pages).to(tl.int64)
    i_k = i_bk % num_pages
    page = tl.load(moves + i_bk).to(tl.int64)
    if page >= 0:
        o = i_c * BLOCK + tl.arange(0, BLOCK)
        m = o < PAGE_ELEMS
        p_src = src + i_b * stride_sb + i_h * stride_sh + page * PAGE_ELEMS + o
        p_dst = dst + i_b * stride_db + i_h * stride_dh + (page_start + i_k.to(tl.int64) * PAGE_ELEMS) + o
        tl.store(p_dst, tl.load(p_src, mask=m), mask=m)


def copy_pages(mirror: torch.Tensor, reserve: torch.Tensor, moves: torch.Tensor, page_size: int, sink: int) -> None:
    """Copy ``mirror`` pages into ``reserve`` page slots where ``moves`` names a page.

    Args:
        mirror: pinned host keys or values, pages contiguous per head. # [B, H, T_cap, D]
        reserve: device reserve, pages contiguous per head. # [B, H, S, D]
        moves: page id to copy into each page slot, -1 for none (on the device). # [B, K]
        page_size: tokens per page.
        sink: sink slots before the first page slot.
    """
    b, h, _, d = reserve.shape
    # a page of one head must be one contiguous run in both; batch and head strides are free (even 0)
    assert mirror.stride(3) == reserve.stride(3) == 1 and mirror.stride(2) == reserve.stride(2) == d
    moves = moves.contiguous()
    page_elems = page_size * d
    block = min(4096, triton.next_power_of_2(page_elems))
    grid = (b * moves.shape[1], h, triton.cdiv(page_elems, block))
    page_copy_kernel[grid](
        mirror,
        reserve,
        moves,
        mirror.stride(0),
        mirror.stride(1),
        reserve.stride(0),
        reserve.stride(1),
        moves.shape[1],
        sink * d,
        PAGE_ELEMS=page_elems,
        BLOCK=block,
        num_warps=4,
    )
