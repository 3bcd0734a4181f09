"""Sparse decode attention over an LSA reserve: the torch reference against attention over explicit key lists."""

import pytest
import torch

from flashmemory.attention.sparse_decode import resolve_backend, sparse_decode
from flashmemory.attention.sparse_decode_ref import ResidentSet, naive_sparse_decode
from flashmemory.memory.layout import ReserveLayout
from flashmemory.memory.resident import resident_positions

from .sparse_decode_cases import explicit_attention, random_case

SHAPES = [
    pytest.param(1, 1, 1, 16, 0, 16, 1, 16, id="mha-one-page-no-sink"),
    pytest.param(2, 4, 2, 16, 4, 16, 3, 24, id="gqa2-ragged"),
    pytest.param(3, 8, 2, 64, 16, 32, 5, 63, id="gqa4-odd-tail"),
    pytest.param(2, 6, 3, 40, 5, 24, 4, 17, id="odd-head-dim-and-page"),
    pytest.param(4, 32, 8, 128, 16, 64, 6, 100, id="llama-heads"),
    pytest.param(2, 28, 4, 128, 16, 64, 3, 129, id="qwen-heads"),
]


def rel_err(out, ref):
    return float((out.double() - ref).norm() / ref.norm())


@pytest.mark.parametrize("b, hq, hkv, d, sink, page, num_pages, tail_cap", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_naive_sparse_decode(b, hq, hkv, d, sink, page, num_pages, tail_cap, dtype):
    q, k, v, rs = random_case(b, hq, hkv, d, sink=sink, page=page, num_pages=num_pages, tail_cap=tail_cap, dtype=dtype)
    ref = explicit_attention(q, k, v, rs)
    out = naive_sparse_decode(q, k, v, rs)
    assert out.dtype == dtype and out.shape == (b, hq, d)
    assert rel_err(out, ref) < (1e-6 if dtype == torch.float32 else 1e-2)


def test_naive_sparse_decode_ignores_what_invalid_slots_hold():
    q, k, v, rs = random_case(3, 8, 2, 32, sink=4, page=16, num_pages=4, tail_cap=40, seed=3)
    valid = rs.slot_positions(k.shape[2]) >= 0
    poisoned_k = k.masked_fill(~valid[:, None, :, None], float("nan"))
    poisoned_v = v.masked_fill(~valid[:, None, :, None], 1e6)
    assert not valid.all()
    out = naive_sparse_decode(q, poisoned_k, poisoned_v, rs)
    torch.testing.assert_close(out, naive_sparse_decode(q, k, v, rs))


def test_resident_set_matches_the_store_positions():
    lay = ReserveLayout(sink=4, num_page_slots=3, page_size=8, tail_capacity=20)
    table = torch.tensor([[2, -1, 0], [1, 3, -1]])
    pad = torch.tensor([0, 5])
    tail_start, seq_len = 32, 41
    expected = resident_positions(lay, table, pad, tail_start, seq_len)
    sink_end = torch.clamp(pad + lay.sink, max=tail_start)
    rs = ResidentSet(
        table,
        (sink_end - pad).clamp(min=0).int(),
        torch.maximum(sink_end, pad).int(),
        torch.full((2,), tail_start, dtype=torch.int32),
        torch.full((2,), seq_len, dtype=torch.int32),
        lay.sink,
        lay.page_size,
    )
    got = rs.slot_positions(lay.num_slots)
    assert torch.equal(got >= 0, expected >= 0)
    page_and_tail = slice(lay.sink, None)
    assert torch.equal(got[:, page_and_tail], expected[:, page_and_tail])


def test_sparse_decode_backend_choice_and_bad_input():
    assert resolve_backend("auto", torch.device("cpu")) == "torch"
    with pytest.raises(ValueError, match="unknown sparse decode backend"):
        resolve_backend("cuda", torch.device("cpu"))
    q, k, v, rs = random_case(2, 4, 2, 16, sink=4, page=16, num_pages=2, tail_cap=16)
    with pytest.raises(ValueError, match="multiple of KV heads"):
        sparse_decode(q[:, :3], k, v, rs)
    with pytest.raises(ValueError, match="no room for a tail"):
        sparse_decode(q, k[:, :, :36], v[:, :, :36], rs)
    torch.testing.assert_close(sparse_decode(q, k, v, rs, backend="torch"), naive_sparse_decode(q, k, v, rs))
