"""A second turn fed through the cache after the prefill (the question-last protocol)."""

import pytest
import torch

from flashmemory.attention.cache import LSACache
from flashmemory.attention.fast_path import FastLSACache
from flashmemory.bench import methods as methods_mod
from flashmemory.bench.runner import encode_sample
from flashmemory.config import LSAConfig
from flashmemory.models.tiny import tiny_model
from flashmemory.runtime.generate import generate_ids

from ..bench.fake_tokenizers import CharTokenizer
from ..conftest import SMALL_LSA


def _ids(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, 250, (1, n), generator=torch.Generator().manual_seed(seed))


def test_encode_splits_the_same_ids_at_the_question():
    tok = CharTokenizer()
    text = "doc What is it? doc doc\n\nWhat is it? (A) x\n\nThe answer is ("
    whole = encode_sample(tok, text, "The answer is (")
    split = encode_sample(tok, text, "The answer is (", "What is it?")
    assert torch.equal(torch.cat([split["input_ids"], split["followup_ids"]], 1), whole["input_ids"])
    assert tok.decode(split["followup_ids"][0].tolist()).startswith("What is it? (A)")  # the last occurrence
    assert split["attention_mask"].shape == split["input_ids"].shape
    with pytest.raises(ValueError, match="no question marker"):
        encode_sample(tok, text, "The answer is (", "Question:")
    with pytest.raises(ValueError, match="no context"):
        encode_sample(tok, "Question: x", "", "Question:")


def test_followup_through_a_full_cache_equals_one_prefill():
    model = tiny_model("llama")
    ids = _ids(120)
    one, _ = generate_ids(model, ids, method="full", max_new_tokens=8)
    two, stats = generate_ids(model, ids[:, :90], method="full", max_new_tokens=8, followup_ids=ids[:, 90:])
    assert torch.equal(one, two) and stats.context_tokens == 120 and stats.new_tokens == 8


@pytest.mark.parametrize("fast", [False, True], ids=["masked", "fast-path"])
def test_lsa_starts_a_cycle_for_the_turn_and_keeps_every_page_like_full(fast):
    model = tiny_model("llama")
    ids = _ids(200, seed=1)
    full, _ = generate_ids(model, ids, method="full", max_new_tokens=6)
    lsa = LSAConfig(budget=None, max_pages=40, **SMALL_LSA)  # every page fits: only the order of work differs
    caches = []

    def factory(m):
        cls = FastLSACache if fast else LSACache
        caches.append(cls(m, lsa, max_new_tokens=6 + 10, **({"backend": "torch"} if fast else {})))
        return caches[-1]

    out, stats = generate_ids(model, ids[:, :190], max_new_tokens=6, followup_ids=ids[:, 190:], cache_factory=factory)
    assert torch.equal(out, full)
    # the first boundary at the turn's first token, the requested one before its last (10 < interval 16)
    assert caches[-1].stats.boundaries == 2 and stats.kv_bytes_full == caches[-1].full_kv_bytes(206)


def test_requested_boundary_reads_the_turn_as_its_query():
    model = tiny_model("llama")
    ids = _ids(200, seed=2)
    lsa = LSAConfig(budget=None, max_pages=2, **SMALL_LSA)
    with LSACache(model, lsa, max_new_tokens=20) as cache:
        model(input_ids=ids[:, :190], past_key_values=cache, use_cache=True)
        for i in range(190, 199):
            model(input_ids=ids[:, i : i + 1], past_key_values=cache, use_cache=True)
        first_scores = cache.last_scores.clone()
        assert cache.lookahead_pos[0, -1] == 198  # the query the early boundary reads: the turn so far
        cache.request_boundary()
        model(input_ids=ids[:, 199:200], past_key_values=cache, use_cache=True)
        assert cache.stats.boundaries == 2 and cache.steps_in_cycle == 1 and not cache.boundary_requested
        assert not torch.equal(cache.last_scores[..., : first_scores.shape[-1]], first_scores)


def test_methods_take_the_turn_and_the_oracle_refuses_it():
    model = tiny_model("llama", num_layers=2)
    ids = _ids(160, seed=3)
    cfg = LSAConfig(budget=0.5, **SMALL_LSA)
    tok = type("T", (), {"eos_token_id": 1})()
    for name in ("full", "lsa", "recent", "quest"):
        out, stats = methods_mod.get_method(name).run(model, tok, ids[:, :150], None, 4, cfg, followup=ids[:, 150:])
        assert len(out) == 1 and stats.new_tokens >= 1
        assert stats.kv_bytes_full >= stats.kv_bytes_device or name == "quest"
    with pytest.raises(ValueError, match="follow-up"):
        methods_mod.get_method("oracle").run(model, tok, ids[:, :150], None, 4, cfg, followup=ids[:, 150:])


def test_early_boundary_drops_a_pending_prefetch():
    model = tiny_model("llama")
    ids = _ids(240, seed=4)
    lsa = LSAConfig(budget=None, max_pages=6, prefetch_steps=5, prefetch_share=0.34, **SMALL_LSA)
    with FastLSACache(model, lsa, max_new_tokens=40, backend="torch") as cache:
        model(input_ids=ids[:, :220], past_key_values=cache, use_cache=True)
        for i in range(220, 233):  # the first boundary, then the prefetch at step 11 of the cycle
            model(input_ids=ids[:, i : i + 1], past_key_values=cache, use_cache=True)
        assert cache.store.prefetch_pending and cache.stats.prefetches == 1
        cache.request_boundary()
        assert cache.next_step_is_boundary()
        model(input_ids=ids[:, 233:234], past_key_values=cache, use_cache=True)
        assert not cache.store.prefetch_pending and cache.stats.boundaries == 2
        # the spare slots stay free for the next prefetch
        assert int((cache.store.page_table >= 0).sum(1).max()) <= 6 - cache.spare_slots
