"""Random reserves with ragged resident sets, and a plain attention over an explicit key list, for the op tests."""

from __future__ import annotations

import torch

from flashmemory.attention.sparse_decode_ref import ResidentSet


def random_case(
    batch: int,
    hq: int,
    hkv: int,
    d: int,
    *,
    sink: int,
    page: int,
    num_pages: int,
    tail_cap: int,
    dtype=torch.float32,
    device="cpu",
    seed: int = 0,
):
    """Random q/k/v and a random resident set per sequence (empty slots, padding, short tails)."""
    gen = torch.Generator().manual_seed(seed)
    num_slots = sink + num_pages * page + tail_cap
    q = torch.randn(batch, hq, d, generator=gen)
    k = torch.randn(batch, hkv, num_slots, d, generator=gen)
    v = torch.randn(batch, hkv, num_slots, d, generator=gen)
    tables, sink_len, lo, tail_start, seq_len = [], [], [], [], []
    for b in range(batch):
        pad = int(torch.randint(0, page + 1, (1,), generator=gen)) if b % 2 else 0
        selectable = num_pages + int(torch.randint(0, 2 * num_pages + 2, (1,), generator=gen))
        ts = (selectable + 1) * page  # tail starts after the selectable pages (page aligned)
        sink_end = min(pad + sink, ts)
        n_resident = int(torch.randint(0, num_pages + 1, (1,), generator=gen))
        pages = torch.randperm(selectable + 1, generator=gen)[:n_resident]
        table = torch.full((num_pages,), -1, dtype=torch.long)
        slots = torch.randperm(num_pages, generator=gen)[:n_resident]
        table[slots] = pages
        tables.append(table)
        sink_len.append(max(0, sink_end - pad))
        lo.append(max(sink_end, pad))
        tail_start.append(ts)
        seq_len.append(ts + 1 + int(torch.randint(0, tail_cap, (1,), generator=gen)))
    i32 = lambda xs: torch.tensor(xs, dtype=torch.int32, device=device)  # noqa: E731
    rs = ResidentSet(torch.stack(tables).to(device), i32(sink_len), i32(lo), i32(tail_start), i32(seq_len), sink, page)
    cast = lambda t: t.to(device=device, dtype=dtype)  # noqa: E731
    return cast(q), cast(k), cast(v), rs


def explicit_attention(q, k, v, rs: ResidentSet, scale=None):
    """Attention written independently of the reference: build each sequence's key list slot by slot."""
    b, hq, d = q.shape
    group = hq // k.shape[1]
    scale = d**-0.5 if scale is None else scale
    out = torch.empty(b, hq, d, dtype=torch.float64)
    tail0 = rs.sink + rs.num_pages * rs.page_size
    for i in range(b):
        slots = list(range(int(rs.sink_len[i])))
        lo, ts, n = int(rs.lo[i]), int(rs.tail_start[i]), int(rs.seq_len[i])
        for s, page in enumerate(rs.page_table[i].tolist()):
            if page < 0:
                continue
            for j in range(rs.page_size):
                if lo <= page * rs.page_size + j < ts:
                    slots.append(rs.sink + s * rs.page_size + j)
        slots += [tail0 + j for j in range(k.shape[2] - tail0) if lo <= ts + j < n]
        idx = torch.tensor(slots, dtype=torch.long)
        for h in range(hq):
            keys = k[i, h // group, idx].double()
            vals = v[i, h // group, idx].double()
            p = torch.softmax(keys @ q[i, h].double() * scale, dim=0)
            out[i, h] = p @ vals
    return out
