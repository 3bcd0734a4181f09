import random

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from flashmemory.memory.layout import ReserveLayout
from flashmemory.memory.store import KVStore

LAYERS = [0, 2]


def make_store(batch=2, seq_len=100, pad=(0, 7), num_slots=3, page_size=8, recent=8, interval=8, sink=4):
    layout = ReserveLayout(sink, num_slots, page_size, recent + page_size - 1 + interval)
    store = KVStore(LAYERS, layout, recent)
    store.allocate(
        batch,
        2,
        4,
        dtype=torch.float32,
        device=torch.device("cpu"),
        capacity=seq_len + 4,
        pad_len=torch.tensor(pad),
    )
    truth = {layer: torch.randn(batch, 2, seq_len + 200, 4) for layer in LAYERS}
    for layer in LAYERS:
        store.write_prefill(layer, truth[layer][:, :, :seq_len], -truth[layer][:, :, :seq_len])
    return store, truth


def assert_consistent(store, truth):
    """Every valid slot holds the true key (and value) of the position it claims."""
    pos = store.slot_pos
    for layer in LAYERS:
        for b in range(pos.shape[0]):
            for s in (pos[b] >= 0).nonzero().flatten().tolist():
                p = int(pos[b, s])
                torch.testing.assert_close(store.reserve_k[layer][b, :, s], truth[layer][b, :, p])
                torch.testing.assert_close(store.reserve_v[layer][b, :, s], -truth[layer][b, :, p])


def random_pages(store, rng):
    k, n = store.layout.num_page_slots, store.selectable_pages()
    rows = []
    for _ in range(store.batch):
        chosen = rng.sample(range(n), min(k, n))
        rows.append(chosen + [-1] * (k - len(chosen)))
    return torch.tensor(rows, dtype=torch.long)


def test_recall_copies_only_new_pages():
    store, truth = make_store()
    pages = torch.tensor([[1, 2, 3], [4, 5, -1]])
    assert store.recall(pages) == 5
    assert_consistent(store, truth)
    assert store.recall(pages) == 0, "the same set must not be copied again"
    assert store.recall(torch.tensor([[3, 2, 6], [5, 4, 1]])) == 2
    assert sorted(store.page_table[0].tolist()) == [2, 3, 6]
    assert sorted(store.page_table[1].tolist()) == [1, 4, 5]
    assert_consistent(store, truth)


@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 10_000), cycles=st.integers(1, 6))
def test_page_table_consistent_under_churn_and_cycles(seed, cycles):
    rng = random.Random(seed)
    store, truth = make_store()
    interval = 8
    store.recall(random_pages(store, rng))
    assert_consistent(store, truth)
    for _ in range(cycles):
        for _ in range(interval):
            store.begin_step()
            t = store.seq_len - 1
            for layer in LAYERS:
                store.append(layer, truth[layer][:, :, t : t + 1], -truth[layer][:, :, t : t + 1])
            assert_consistent(store, truth)
        before = len(store.log.copy_steps)
        store.end_cycle()
        store.recall(random_pages(store, rng))
        assert len(store.log.copy_steps) <= before + 1
        assert_consistent(store, truth)
        for row in store.page_table.tolist():
            live = [p for p in row if p >= 0]
            assert len(live) == len(set(live))
        for layer in LAYERS:
            torch.testing.assert_close(
                store.mirror_k[layer][:, :, : store.seq_len], truth[layer][:, :, : store.seq_len]
            )


def test_copies_happen_only_at_recall():
    store, truth = make_store()
    store.recall(torch.tensor([[0, 1, 2], [3, 4, 5]]))
    h2d = store.log.h2d_bytes
    for _ in range(8):
        store.begin_step()
        t = store.seq_len - 1
        for layer in LAYERS:
            store.append(layer, truth[layer][:, :, t : t + 1], -truth[layer][:, :, t : t + 1])
    assert store.log.h2d_bytes == h2d, "decode steps between boundaries must not copy pages"


def test_recall_rejects_wrong_shape():
    store, _ = make_store()
    with pytest.raises(ValueError, match="shape"):
        store.recall(torch.tensor([[1, 2]]))


def test_tail_overflow_is_detected():
    store, truth = make_store()
    with pytest.raises(RuntimeError, match="overflow"):
        for _ in range(100):
            store.begin_step()


def test_a_prefill_longer_than_the_mirror_grows_it_and_keeps_every_token():
    layout = ReserveLayout(4, 3, 8, 8 + 8 - 1 + 8)
    store = KVStore(LAYERS, layout, 8)
    store.allocate(1, 2, 4, dtype=torch.float32, device=torch.device("cpu"), capacity=40, pad_len=torch.tensor([0]))
    keys = torch.randn(1, 2, 100, 4)
    for layer in LAYERS:
        store.write_prefill(layer, keys + layer, -keys - layer)
    assert store.capacity >= 100
    for layer in LAYERS:
        torch.testing.assert_close(store.mirror_k[layer][:, :, :100], keys + layer, rtol=0, atol=0)
        torch.testing.assert_close(store.mirror_v[layer][:, :, :100], -keys - layer, rtol=0, atol=0)
