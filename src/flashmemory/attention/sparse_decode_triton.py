"""Triton flash-decoding over an LSA reserve, reading keys and values through the page table.

Pass 1 (:func:`sparse_decode_fwd_kernel`): one program per (sequence, KV head, split of the key axis). It holds
all query heads of its KV head (GQA) as one ``[G, D]`` tile, walks its share of the reserve tile by tile
(sink tiles, then ``page_size`` pages through the page table, then the tail), reads nothing from empty page
slots and unwritten tail tiles (masked loads), and keeps an online softmax in fp32. It writes a normalised
partial output and its base-2 log-sum-exp per split. Pass 2 (:func:`sparse_decode_reduce_kernel`) merges the
splits. Nothing is gathered: slot ``s`` of the reserve is read in place.

Triton is imported here only, and this module is imported lazily (see :mod:`.sparse_decode`), so the package
works without Triton.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from .sparse_decode_ref import ResidentSet, check_sparse_decode_inputs


@triton.jit
def _attend_tile(
    b_q, p_k0, p_v0, slot, m_n, m_d, o_d, stride_ks, stride_vs, scale_log2, b_m, b_l, b_acc, USE_IEEE: tl.constexpr
):
    """One tile of keys and values into the running softmax: returns the new maxima, sums and accumulator."""
    slot64 = slot.to(tl.int64)
    m_kv = m_n[:, None] & m_d[None, :]
    b_k = tl.load(p_k0 + slot64[:, None] * stride_ks + o_d[None, :], mask=m_kv, other=0.0)  # [BN, BD]
    b_v = tl.load(p_v0 + slot64[:, None] * stride_vs + o_d[None, :], mask=m_kv, other=0.0)  # [BN, BD]
    if USE_IEEE:
        b_s = tl.dot(b_q, tl.trans(b_k), input_precision="ieee")
    else:
        b_s = tl.dot(b_q, tl.trans(b_k))
    # the cast keeps the scores fp32 when a compiler hands the scale over as a float64 scalar
    b_s = tl.where(m_n[None, :], (b_s * scale_log2).to(tl.float32), float("-inf"))  # [BG, BN]
    b_m_new = tl.maximum(b_m, tl.max(b_s, 1))
    # a tile with no valid key leaves -inf maxima; shift by 0 there so exp2 yields 0, not NaN
    b_shift = tl.where(b_m_new == float("-inf"), 0.0, b_m_new)
    b_p = tl.exp2(b_s - b_shift[:, None])
    b_alpha = tl.exp2(b_m - b_shift)
    b_l = b_l * b_alpha + tl.sum(b_p, 1)
    if USE_IEEE:
        b_pv = tl.dot(b_p.to(b_v.dtype), b_v, input_precision="ieee")
    else:
        b_pv = tl.dot(b_p.to(b_v.dtype), b_v)
    b_acc = b_acc * b_alpha[:, None] + b_pv
    return b_m_new, b_l, b_acc


@triton.jit(do_not_specialize=["num_pages", "tail_cap", "tiles_per_split", "num_tiles", "num_splits"])
def sparse_decode_fwd_kernel(
    q,
    k,
    v,
    page_table,
    sink_len,
    lo,
    tail_start,
    seq_len,
    o_part,
    lse_part,
    stride_qb,
    stride_qh,
    stride_kb,
    stride_kh,
    stride_ks,
    stride_vb,
    stride_vh,
    stride_vs,
    stride_pb,
    num_pages,
    tail_cap,
    tiles_per_split,
    num_tiles,
    num_splits,
    scale_log2,
    HKV: tl.constexpr,
    G: tl.constexpr,
    BLOCK_G: tl.constexpr,
    D: tl.constexpr,
    BLOCK_D: tl.constexpr,
    SINK: tl.constexpr,
    PAGE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    USE_IEEE: tl.constexpr,
    BRANCHLESS: tl.constexpr,
):
    i_bh = tl.program_id(0)
    i_s = tl.program_id(1)
    i_b = i_bh // HKV
    i_h = i_bh % HKV
    i_b64 = i_b.to(tl.int64)

    NUM_SINK_TILES: tl.constexpr = (SINK + BLOCK_N - 1) // BLOCK_N
    TILES_PER_PAGE: tl.constexpr = (PAGE + BLOCK_N - 1) // BLOCK_N
    num_page_tiles = num_pages * TILES_PER_PAGE

    b_sink_len = tl.load(sink_len + i_b)
    b_lo = tl.load(lo + i_b)
    b_tail_start = tl.load(tail_start + i_b)
    b_seq_len = tl.load(seq_len + i_b)

    o_g = tl.arange(0, BLOCK_G)
    o_d = tl.arange(0, BLOCK_D)
    o_n = tl.arange(0, BLOCK_N)
    m_g = o_g < G
    m_d = o_d < D
    p_q = q + i_b64 * stride_qb + (i_h * G + o_g)[:, None].to(tl.int64) * stride_qh + o_d[None, :]
    b_q = tl.load(p_q, mask=m_g[:, None] & m_d[None, :], other=0.0)  # [BG, BD]

    p_k0 = k + i_b64 * stride_kb + i_h.to(tl.int64) * stride_kh
    p_v0 = v + i_b64 * stride_vb + i_h.to(tl.int64) * stride_vh

    b_m = tl.full([BLOCK_G], float("-inf"), dtype=tl.float32)
    b_l = tl.zeros([BLOCK_G], dtype=tl.float32)
    b_acc = tl.zeros([BLOCK_G, BLOCK_D], dtype=tl.float32)

    t_lo = i_s * tiles_per_split
    for j in range(0, tiles_per_split):
        t = t_lo + j
        is_sink = t < NUM_SINK_TILES
        is_page = (t >= NUM_SINK_TILES) & (t < NUM_SINK_TILES + num_page_tiles)
        # sink tile
        sink_off = t * BLOCK_N + o_n
        # page tile: which page slot, which part of the page, and which page it holds
        u = tl.minimum(tl.maximum(t - NUM_SINK_TILES, 0), num_page_tiles - 1)
        k_slot = u // TILES_PER_PAGE
        in_page = (u % TILES_PER_PAGE) * BLOCK_N + o_n
        page = tl.load(page_table + i_b64 * stride_pb + k_slot, mask=is_page, other=-1).to(tl.int64)
        page_pos = page * PAGE + in_page
        # tail tile
        in_tail = (t - NUM_SINK_TILES - num_page_tiles) * BLOCK_N + o_n
        tail_pos = b_tail_start + in_tail
        if BRANCHLESS:
            # masks instead of branches: a straight-line loop body lets the compiler pipeline the loads of the
            # next tile behind this tile's math; masked-off lanes (empty slots, unwritten tail) fetch nothing
            slot = tl.where(
                is_sink, sink_off, tl.where(is_page, SINK + k_slot * PAGE + in_page, SINK + num_pages * PAGE + in_tail)
            )
            m_page = (in_page < PAGE) & (page_pos >= b_lo) & (page_pos < b_tail_start) & (page >= 0)
            m_tail = (in_tail < tail_cap) & (tail_pos >= b_lo) & (tail_pos < b_seq_len)
            m_n = tl.where(is_sink, sink_off < b_sink_len, tl.where(is_page, m_page, m_tail)) & (t < num_tiles)
        else:
            if is_sink:
                slot = sink_off
                m_n = sink_off < b_sink_len
                active = t * BLOCK_N < b_sink_len
            elif is_page:
                slot = SINK + k_slot * PAGE + in_page
                m_n = (in_page < PAGE) & (page_pos >= b_lo) & (page_pos < b_tail_start)
                active = page >= 0
            else:
                slot = SINK + num_pages * PAGE + in_tail
                m_n = (in_tail < tail_cap) & (tail_pos >= b_lo) & (tail_pos < b_seq_len)
                active = b_tail_start + (t - NUM_SINK_TILES - num_page_tiles) * BLOCK_N < b_seq_len
        if BRANCHLESS:
            b_m, b_l, b_acc = _attend_tile(
                b_q, p_k0, p_v0, slot, m_n, m_d, o_d, stride_ks, stride_vs, scale_log2, b_m, b_l, b_acc, USE_IEEE
            )
        elif active & (t < num_tiles):
            b_m, b_l, b_acc = _attend_tile(
                b_q, p_k0, p_v0, slot, m_n, m_d, o_d, stride_ks, stride_vs, scale_log2, b_m, b_l, b_acc, USE_IEEE
            )

    has = b_l > 0
    b_out = b_acc / tl.where(has, b_l, 1.0)[:, None]
    b_lse = tl.where(has, b_m + tl.log2(tl.where(has, b_l, 1.0)), float("-inf"))
    row = (i_b64 * HKV + i_h) * G + o_g  # query head rows of this program
    p_o = o_part + (row[:, None].to(tl.int64) * num_splits + i_s) * D + o_d[None, :]
    tl.store(p_o, b_out, mask=m_g[:, None] & m_d[None, :])
    tl.store(lse_part + row.to(tl.int64) * num_splits + i_s, b_lse, mask=m_g)


@triton.jit
def sparse_decode_reduce_kernel(
    o_part,
    lse_part,
    out,
    stride_ob,
    stride_oh,
    HQ: tl.constexpr,
    D: tl.constexpr,
    BLOCK_D: tl.constexpr,
    NUM_SPLITS: tl.constexpr,
    BLOCK_S: tl.constexpr,
):
    i_row = tl.program_id(0).to(tl.int64)
    i_b = i_row // HQ
    i_h = i_row % HQ
    o_s = tl.arange(0, BLOCK_S)
    o_d = tl.arange(0, BLOCK_D)
    m_s = o_s < NUM_SPLITS
    m_d = o_d < D
    b_lse = tl.load(lse_part + i_row * NUM_SPLITS + o_s, mask=m_s, other=float("-inf"))  # [BS]
    b_max = tl.max(b_lse, 0)
    b_w = tl.exp2(b_lse - b_max)
    b_w = tl.where(m_s & (b_lse > float("-inf")), b_w, 0.0)
    p_o = o_part + (i_row * NUM_SPLITS + o_s[:, None]) * D + o_d[None, :]
    b_o = tl.load(p_o, mask=m_s[:, None] & m_d[None, :], other=0.0)  # [BS, BD]
    b_res = tl.sum(b_o * b_w[:, None], 0) / tl.sum(b_w, 0)
    tl.store(out + i_b * stride_ob + i_h * stride_oh + o_d, b_res.to(out.dtype.element_ty), mask=m_d)


def _num_tiles(rs: ResidentSet, num_slots: int, block_n: int) -> int:
    """Key tiles of ``block_n`` slots the kernel walks: the sink's, each page slot's, and the tail's."""
    tail_cap = rs.tail_capacity(num_slots)
    return (
        triton.cdiv(rs.sink, block_n)
        + rs.num_pages * triton.cdiv(rs.page_size, block_n)
        + triton.cdiv(tail_cap, block_n)
    )


def _num_splits(num_programs: int, num_tiles: int, device: torch.device) -> int:
    """Splits of the key axis: about four programs per multiprocessor (flash-decoding), and at least 16.

    The floor of 16 is measured (``benchmarks/results/decode_kernel_sweep_h200/``): at batch 8 four programs per
    multiprocessor leave 9 splits, and 16 read the reserve 20-27% faster; at batch 1 the first rule already gives
    64-132 splits, where the best count was.
    """
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 8
    want = max(16, math.ceil(4 * sms / max(num_programs, 1)))
    return max(1, min(want, num_tiles, 256))


def sparse_decode_fwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    rs: ResidentSet,
    scale: float,
    num_splits: int | None = None,
    block_n: int | None = None,
    num_warps: int = 4,
    num_stages: int = 2,
    branchless: bool = True,
) -> torch.Tensor:
    """Launch both passes. Shapes as in :func:`sparse_decode`; returns ``[B, Hq, D]`` in the dtype of ``q``.

    ``num_splits``, ``block_n``, ``num_warps``, ``num_stages`` and ``branchless`` (masked loads instead of
    branches in the key loop) are the kernel's tuning knobs; ``benchmarks/decode_kernel_sweep.py`` times them.
    The defaults are that sweep's best on an H200: the masked-load loop read a 128K reserve 26% faster at batch 1
    than the branching one, which stalls on each tile's loads.
    """
    b, hq, d = q.shape
    hkv, num_slots = k.shape[1], k.shape[2]
    group = hq // hkv
    assert q.stride(-1) == 1 and k.stride(-1) == 1 and v.stride(-1) == 1, "last dimension must be contiguous"
    assert k.dtype == v.dtype == q.dtype, "q, k and v must share one dtype"
    page = rs.page_size
    if block_n is None:
        block_n = max(16, min(64, triton.next_power_of_2(page)))
    tail_cap = rs.tail_capacity(num_slots)
    num_tiles = _num_tiles(rs, num_slots, block_n)
    splits = num_splits or _num_splits(b * hkv, num_tiles, q.device)
    tiles_per_split = triton.cdiv(num_tiles, splits)
    splits = triton.cdiv(num_tiles, tiles_per_split)
    o_part = torch.empty(b, hq, splits, d, device=q.device, dtype=torch.float32)
    lse_part = torch.empty(b, hq, splits, device=q.device, dtype=torch.float32)
    table = rs.page_table
    if table.stride(-1) != 1:
        table = table.contiguous()
    sparse_decode_fwd_kernel[(b * hkv, splits)](
        q,
        k,
        v,
        table,
        rs.sink_len,
        rs.lo,
        rs.tail_start,
        rs.seq_len,
        o_part,
        lse_part,
        q.stride(0),
        q.stride(1),
        k.stride(0),
        k.stride(1),
        k.stride(2),
        v.stride(0),
        v.stride(1),
        v.stride(2),
        table.stride(0),
        rs.num_pages,
        tail_cap,
        tiles_per_split,
        num_tiles,
        splits,
        scale * math.log2(math.e),
        HKV=hkv,
        G=group,
        BLOCK_G=max(16, triton.next_power_of_2(group)),
        D=d,
        BLOCK_D=max(16, triton.next_power_of_2(d)),
        SINK=rs.sink,
        PAGE=page,
        BLOCK_N=block_n,
        USE_IEEE=q.dtype == torch.float32,
        BRANCHLESS=branchless,
        num_warps=num_warps,
        num_stages=num_stages,
    )
    out = torch.empty(b, hq, d, device=q.device, dtype=q.dtype)
    sparse_decode_reduce_kernel[(b * hq,)](
        o_part,
        lse_part,
        out,
        out.stride(0),
        out.stride(1),
        HQ=hq,
        D=d,
        BLOCK_D=max(16, triton.next_power_of_2(d)),
        NUM_SPLITS=splits,
        BLOCK_S=max(2, triton.next_power_of_2(splits)),
        num_warps=4,
    )
    return out


def sparse_decode_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    rs: ResidentSet,
    scale: float | None = None,
    num_splits: int | None = None,
) -> torch.Tensor:
    """Validated entry point of the Triton kernel; see :func:`flashmemory.attention.sparse_decode.sparse_decode`."""
    check_sparse_decode_inputs(q, k, v, rs)
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"sparse decode supports fp16, bf16 and fp32, got {q.dtype}")
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    return sparse_decode_fwd(q, k, v, rs, scale, num_splits)
