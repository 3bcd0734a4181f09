import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from flashmemory.memory.layout import ReserveLayout
from flashmemory.memory.resident import page_aligned_tail_start, resident_positions


@settings(max_examples=200, deadline=None)
@given(
    seq_len=st.integers(1, 400),
    pad=st.integers(0, 50),
    sink=st.integers(0, 12),
    page_size=st.sampled_from([4, 8, 16]),
    recent=st.integers(0, 40),
    num_slots=st.integers(0, 10),
    data=st.data(),
)
def test_resident_positions_unique_and_always_keeps_sink_and_tail(
    seq_len, pad, sink, page_size, recent, num_slots, data
):
    pad = min(pad, seq_len - 1)
    tail_start = page_aligned_tail_start(seq_len, recent, page_size)
    layout = ReserveLayout(sink, num_slots, page_size, recent + page_size - 1 + 8)
    selectable = tail_start // page_size
    pages = data.draw(st.lists(st.integers(0, max(selectable - 1, 0)), max_size=num_slots, unique=True))
    pages = pages if selectable else []
    table = torch.full((1, num_slots), -1, dtype=torch.long)
    table[0, : len(pages)] = torch.tensor(pages, dtype=torch.long)
    pos = resident_positions(layout, table, torch.tensor([pad]), tail_start, seq_len)[0]
    valid = pos[pos >= 0].tolist()
    assert len(valid) == len(set(valid)), "a position is resident twice"
    assert all(pad <= p < seq_len for p in valid)
    resident = set(valid)
    assert set(range(pad, min(pad + sink, seq_len))) <= resident, "sink missing"
    assert set(range(max(tail_start, pad), seq_len)) <= resident, "recent tail missing"
    assert seq_len - tail_start >= min(recent, seq_len)
    for p in pages:
        span = set(range(max(p * page_size, pad), (p + 1) * page_size))
        assert span <= resident, "selected page not fully resident"
    expected = set(range(pad, min(pad + sink, seq_len))) | set(range(max(tail_start, pad), seq_len))
    for p in pages:
        expected |= set(range(max(p * page_size, pad), (p + 1) * page_size))
    assert resident == expected


def test_page_aligned_tail_start():
    assert page_aligned_tail_start(100, 10, 16) == 80
    assert page_aligned_tail_start(5, 10, 16) == 0
    assert page_aligned_tail_start(96, 0, 16) == 96
