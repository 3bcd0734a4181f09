"""The KV mirror and a captured prefix in page-locked blocks from the pool (run on the GPU machine)."""

import gc

import pytest
import torch

from flashmemory.memory.layout import ReserveLayout
from flashmemory.memory.pinned import HOST_POOL
from flashmemory.memory.store import KVStore

pytestmark = pytest.mark.cuda

LAYERS = [0, 1, 3]


def cuda_store(capacity: int, heads: int = 2, dim: int = 64) -> KVStore:
    store = KVStore(LAYERS, ReserveLayout(4, 3, 16, 16 + 15 + 16), 16)
    store.allocate(
        1, heads, dim, dtype=torch.bfloat16, device=torch.device("cuda"), capacity=capacity, pad_len=torch.tensor([0])
    )
    return store


def test_the_mirror_is_one_exact_page_locked_block_reused_by_the_next_store():
    HOST_POOL.empty()
    locked = HOST_POOL.blocks_locked
    store = cuda_store(1000)
    mirrors = store.host_tensors()
    assert all(t.is_pinned() for t in mirrors)
    nbytes = sum(t.numel() * t.element_size() for t in mirrors)
    assert nbytes == 2 * len(LAYERS) * 2 * 1000 * 64 * 2
    assert store._mirror_block.nbytes == nbytes and HOST_POOL.blocks_locked == locked + 1
    ptr = mirrors[0].data_ptr()
    keys = torch.randn(1, 2, 300, 64, device="cuda", dtype=torch.bfloat16)
    for layer in LAYERS:
        store.write_prefill(layer, keys, -keys)
    store.wait_mirror()
    torch.testing.assert_close(store.mirror_k[LAYERS[-1]][:, :, :300], keys.cpu(), rtol=0, atol=0)
    del store, mirrors
    gc.collect()
    again = cuda_store(900)  # fits in the freed block: nothing newly locked
    assert HOST_POOL.blocks_locked == locked + 1 and again.host_tensors()[0].data_ptr() == ptr


def test_a_growing_mirror_moves_to_a_new_block_keeps_its_tokens_and_frees_the_old_one():
    HOST_POOL.empty()
    store = cuda_store(64)
    old_bytes = store._mirror_block.nbytes
    keys = torch.randn(1, 2, 200, 64, device="cuda", dtype=torch.bfloat16)
    for layer in LAYERS:
        store.write_prefill(layer, keys, -keys)
    store.wait_mirror()
    assert store.capacity >= 200 and all(t.is_pinned() for t in store.host_tensors())
    for layer in LAYERS:
        torch.testing.assert_close(store.mirror_v[layer][:, :, :200], -keys.cpu(), rtol=0, atol=0)
    assert HOST_POOL.free_bytes == old_bytes


def test_pages_recalled_from_a_pooled_mirror_match_the_prompt():
    store = cuda_store(512)
    keys = torch.randn(1, 2, 400, 64, device="cuda", dtype=torch.bfloat16)
    for layer in LAYERS:
        store.write_prefill(layer, keys, -keys)
    store.recall(torch.tensor([[2, 5, 0]], device="cuda"))
    torch.cuda.synchronize()
    pos = store.slot_pos[0].cpu()
    start = store.layout.sink
    page_pos = pos[start : start + 3 * store.layout.page_size]
    page_pos = page_pos[page_pos >= 0]  # page 0's first tokens are the sink's
    assert sorted(set((page_pos // store.layout.page_size).tolist())) == [0, 2, 5]
    for layer in LAYERS:
        valid = (pos >= 0).nonzero().flatten()
        got = store.reserve_k[layer][0, :, valid]
        torch.testing.assert_close(got, keys[0, :, pos[valid].cuda()], rtol=0, atol=0)


def test_a_captured_prefix_lives_in_page_locked_blocks_it_holds():
    from flashmemory.attention.prefix import PrefixKV
    from flashmemory.models.tiny import tiny_model

    model = tiny_model("llama").cuda()
    ids = torch.randint(0, model.config.vocab_size, (1, 50), device="cuda")
    prefix = PrefixKV.capture(model, ids)
    assert len(prefix.blocks) == model.config.num_hidden_layers
    assert all(t.is_pinned() for t in (*prefix.keys, *prefix.values))
    k, _ = prefix.layer(0, torch.device("cuda"), prefix.keys[0].dtype)
    assert k.shape[2] == 50
