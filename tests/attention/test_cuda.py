"""The equivalence ladder and the byte accounting on a CUDA device (run on the GPU machine)."""

import pytest
import torch
from transformers.cache_utils import DynamicCache

from flashmemory.attention.cache import LSACache
from flashmemory.config import LSAConfig
from flashmemory.models.tiny import tiny_model
from flashmemory.runtime.generate import generate_ids

from ..conftest import SMALL_LSA
from .decode_helpers import greedy_logits

pytestmark = pytest.mark.cuda


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3", "gemma3"])
def test_lsa_cache_keeping_every_page_equals_full_attention_cuda(family):
    model = tiny_model(family).cuda()
    ids = torch.randint(0, model.config.vocab_size, (1, 203), device="cuda")
    ref_tokens, ref_logits = greedy_logits(model, ids, DynamicCache(config=model.config), 40)
    with LSACache(model, LSAConfig(budget=None, max_pages=10_000, **SMALL_LSA), max_new_tokens=50) as cache:
        tokens, logits = greedy_logits(model, ids, cache, 40)
        assert cache.store.mirror_k[cache.first_lsa_layer].is_pinned()
    assert torch.equal(tokens, ref_tokens)
    torch.testing.assert_close(logits, ref_logits, atol=1e-4, rtol=0)


def test_forced_resident_set_equals_masked_attention_cuda():
    model = tiny_model("llama").cuda()
    ids = torch.randint(0, model.config.vocab_size, (1, 240), device="cuda")
    gen = torch.Generator().manual_seed(7)

    def forced(cache):
        n, k = cache.store.selectable_pages(), cache.store.layout.num_page_slots
        return torch.randperm(n, generator=gen)[:k].view(1, -1)

    resident = []
    with LSACache(model, LSAConfig(budget=None, max_pages=5, **SMALL_LSA), max_new_tokens=60, forced_pages=forced) as c:
        tokens, logits = greedy_logits(
            model, ids, c, 50, on_step=lambda s: resident.append(c.store.slot_pos[0][c.store.slot_pos[0] >= 0].tolist())
        )
    cache = DynamicCache(config=model.config)
    out = model(input_ids=ids, past_key_values=cache, use_cache=True)
    ref = [out.logits[:, -1]]
    for step in range(tokens.shape[1]):
        mask = torch.zeros(1, 1, 1, ids.shape[1] + step + 1, dtype=torch.bool, device="cuda")
        mask[0, 0, 0, resident[step]] = True
        out = model(input_ids=tokens[:, step : step + 1], past_key_values=cache, attention_mask=mask)
        ref.append(out.logits[:, -1])
    torch.testing.assert_close(logits, torch.stack(ref, 1), atol=1e-4, rtol=0)


def test_device_kv_bytes_agree_with_the_allocator():
    model = tiny_model("llama", dtype=torch.bfloat16).cuda()
    ids = torch.randint(1, 200, (2, 4096), device="cuda")
    _, stats = generate_ids(model, ids, lsa=LSAConfig(budget=0.25), max_new_tokens=70)
    assert stats.kv_ratio <= 0.25
    # the allocator also holds the last logits, page table and lookahead window: a small slack
    assert abs(stats.allocator_kv_bytes - stats.kv_bytes_device) < 0.05 * stats.kv_bytes_device + 2**20
    _, full = generate_ids(model, ids, method="full", max_new_tokens=70)
    assert stats.kv_bytes_device < 0.3 * full.kv_bytes_device


@pytest.mark.parametrize("fast", [False, True])
def test_token_keys_read_from_the_host_mirror_score_as_on_the_cpu(fast):
    """The first boundary scores token keys read from the pinned mirror right after the prefill wrote them."""
    from dataclasses import replace

    from flashmemory.attention.fast_path import build_lsa_cache

    model = tiny_model("llama")
    ids = torch.randint(1, 200, (2, 3000))
    lsa = replace(LSAConfig(budget=0.3, **SMALL_LSA), first_boundary_keys="token")
    with LSACache(model, lsa, max_new_tokens=8) as cache:
        greedy_logits(model, ids, cache, 1)
        expected = cache.last_scores.clone()
    model = model.cuda()
    gpu_lsa = replace(lsa, attention_backend="triton" if fast else "mask")
    with build_lsa_cache(model, gpu_lsa, max_new_tokens=8) as cache:
        greedy_logits(model, ids.cuda(), cache, 1)
        # the store is allocated by the prefill; its mirror is host memory, which the scorer read
        assert cache.store.mirror_k[cache.targets[0]].device.type == "cpu"
        torch.testing.assert_close(cache.last_scores.cpu(), expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("fast", [False, True])
def test_later_boundary_token_keys_wait_for_the_cycle_flush_cuda(fast):
    """A later boundary reads the mirror that the cycle's end flushed (on the copy stream, on the fast path)."""
    from dataclasses import replace

    from flashmemory.attention.fast_path import build_lsa_cache

    model = tiny_model("llama")
    ids = torch.randint(1, 200, (1, 3000 + SMALL_LSA["interval"] + 1))
    prompt = 3000
    lsa = replace(LSAConfig(budget=0.3, **SMALL_LSA), first_boundary_keys="chunk", later_boundary_keys="token")

    def second_boundary_scores(cache, ids):
        model(input_ids=ids[:, :prompt], past_key_values=cache, use_cache=True)
        for i in range(prompt, ids.shape[1]):  # teacher-forced: both devices see the same tokens
            model(input_ids=ids[:, i : i + 1], past_key_values=cache, use_cache=True)
        assert cache.stats.boundaries == 2
        return cache.last_scores.clone()

    with LSACache(model, lsa, max_new_tokens=80) as cache:
        expected = second_boundary_scores(cache, ids)
    model = model.cuda()
    gpu_lsa = replace(lsa, attention_backend="triton" if fast else "mask")
    with build_lsa_cache(model, gpu_lsa, max_new_tokens=80) as cache:
        got = second_boundary_scores(cache, ids.cuda())
    torch.testing.assert_close(got.cpu(), expected, rtol=1e-4, atol=1e-4)


def test_token_keys_of_a_pinned_mirror_slice_reach_the_device_unchanged_cuda():
    from flashmemory.memory.host_rows import keys_to_device

    mirror = torch.randn(2, 4, 300, 64, dtype=torch.bfloat16).pin_memory()
    block = mirror[:, :, 64:256]
    got = keys_to_device(block, torch.device("cuda"))
    torch.cuda.synchronize()
    assert got.is_cuda and got.shape == block.shape
    assert torch.equal(got.cpu(), block)


def test_device_rows_land_in_a_pinned_mirror_slice_unchanged_cuda():
    from flashmemory.memory.host_rows import copy_to_host_slice

    mirror = torch.zeros(2, 4, 300, 64, dtype=torch.bfloat16).pin_memory()
    keys = torch.randn(2, 300, 4, 64, dtype=torch.bfloat16, device="cuda").transpose(1, 2)  # as attention lays out
    copy_to_host_slice(keys[:, :, :200], mirror[:, :, :200])
    torch.cuda.synchronize()
    assert torch.equal(mirror[:, :, :200], keys[:, :, :200].cpu())
    assert not mirror[:, :, 200:].any()
