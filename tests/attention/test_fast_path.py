"""The fast path (paged sparse decode, device-side step state and recall) against the masked LSA path."""

import pytest
import torch

from flashmemory.attention.cache import LSACache
from flashmemory.attention.fast_path import FastLSACache, build_lsa_cache
from flashmemory.config import LSAConfig
from flashmemory.memory.async_store import plan_moves
from flashmemory.models.tiny import tiny_model
from flashmemory.runtime.generate import generate_ids

from ..conftest import SMALL_LSA
from .decode_helpers import greedy_logits, random_pages


@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma3"])
def test_fast_path_equals_masked_path_on_a_churning_resident_set(family):
    model = tiny_model(family)
    ids = torch.randint(0, model.config.vocab_size, (2, 240))
    lsa = LSAConfig(budget=None, max_pages=5, **SMALL_LSA)
    with LSACache(model, lsa, max_new_tokens=60, forced_pages=random_pages(7)) as cache:
        ref_tokens, ref_logits = greedy_logits(model, ids, cache, 50)
    impl = model.config._attn_implementation
    with FastLSACache(model, lsa, max_new_tokens=60, forced_pages=random_pages(7), backend="torch") as cache:
        assert model.config._attn_implementation != impl  # decode runs through the registered sparse attention
        tokens, logits = greedy_logits(model, ids, cache, 50)
        cache.sync_stats()
        assert cache.stats.boundaries == 4 and sum(cache.stats.pages_recalled) > 5
    assert model.config._attn_implementation == impl  # restored on close
    assert torch.equal(tokens, ref_tokens)
    torch.testing.assert_close(logits, ref_logits, atol=1e-4, rtol=0)


def test_fast_path_in_generate_with_left_padding_and_a_budget():
    model = tiny_model("llama")
    ids = torch.randint(1, 200, (2, 300))
    mask = torch.ones_like(ids)
    ids[1, :57], mask[1, :57] = 0, 0
    ref, ref_stats = generate_ids(model, ids, mask, lsa=LSAConfig(budget=0.4, **SMALL_LSA), max_new_tokens=40)
    fast_lsa = LSAConfig(budget=0.4, attention_backend="torch", **SMALL_LSA)
    out, stats = generate_ids(model, ids, mask, lsa=fast_lsa, max_new_tokens=40)
    assert torch.equal(out, ref)
    assert stats.pages_recalled == ref_stats.pages_recalled
    assert stats.above_threshold == pytest.approx(ref_stats.above_threshold)
    assert stats.kv_bytes_device == ref_stats.kv_bytes_device


def test_build_lsa_cache_picks_the_backend():
    model = tiny_model("llama")
    with build_lsa_cache(model, LSAConfig(**SMALL_LSA)) as cache:  # auto on CPU: the masked path
        assert type(cache) is LSACache
    with build_lsa_cache(model, LSAConfig(attention_backend="torch", **SMALL_LSA)) as cache:
        assert isinstance(cache, FastLSACache)
    with pytest.raises(ValueError, match="attention_backend"):
        LSAConfig(attention_backend="cuda")


def test_plan_moves_keeps_resident_pages_in_place():
    old = torch.tensor([[3, -1, 7, 1], [0, 1, 2, 3]])
    new = torch.tensor([[1, 2, 7, 9], [-1, -1, -1, -1]])
    table, moves = plan_moves(old, new)
    assert table.tolist() == [[2, 9, 7, 1], [-1, -1, -1, -1]]
    assert moves.tolist() == [[2, 9, -1, -1], [-1, -1, -1, -1]]
    gen = torch.Generator().manual_seed(0)
    for _ in range(50):
        k = 6
        old = torch.where(
            torch.rand(3, k, generator=gen) < 0.3,
            -1,
            torch.stack([torch.randperm(12, generator=gen)[:k] for _ in range(3)]),
        )
        new = torch.where(
            torch.rand(3, k, generator=gen) < 0.3,
            -1,
            torch.stack([torch.randperm(12, generator=gen)[:k] for _ in range(3)]),
        )
        table, moves = plan_moves(old, new)
        for b in range(3):
            want = {int(p) for p in new[b] if p >= 0}
            assert {int(p) for p in table[b] if p >= 0} == want
            for s in range(k):
                if old[b, s] >= 0 and int(old[b, s]) in want:
                    assert table[b, s] == old[b, s] and moves[b, s] == -1  # never copied again
                elif table[b, s] >= 0:
                    assert moves[b, s] == table[b, s]


def test_decode_mask_is_skipped_the_same_way_inside_a_graph_capture(monkeypatch):
    """transformers builds the mask while a CUDA graph is captured and skips it otherwise; a compiled decoder would
    then meet new guards inside the capture and compile there. The fast path's mask never depends on it."""
    import transformers.utils.import_utils as import_utils
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    from flashmemory.attention.fast_path import attention_key

    ours = AttentionMaskInterface._global_mapping[attention_key("sdpa")]
    decode = dict(batch_size=1, q_length=1, kv_length=10, q_offset=torch.tensor(9), kv_offset=0, device="cpu")
    assert sdpa_mask(**decode) is None and ours(**decode) is None
    monkeypatch.setattr(import_utils, "is_cuda_stream_capturing", lambda: True)
    assert sdpa_mask(**decode) is not None  # what a capture sees without the fast path's mask function
    assert ours(**decode) is None
    # anything a one-token query without padding does not cover still gets the full mask
    padding = torch.tensor([[0] * 3 + [1] * 7])
    for changed in (dict(q_length=2, kv_length=11), dict(attention_mask=padding), dict(local_size=4)):
        kw = decode | changed
        torch.testing.assert_close(ours(**kw), sdpa_mask(**kw))
