import pytest
import torch
from transformers.cache_utils import DynamicCache

from flashmemory.attention.cache import LSACache
from flashmemory.config import LSAConfig
from flashmemory.memory.layout import BudgetError
from flashmemory.models import adapter
from flashmemory.models.adapter import backbone_spec
from flashmemory.models.tiny import TINY_FAMILIES, tiny_model
from flashmemory.runtime.generate import generate_ids

from ..conftest import SMALL_LSA
from .decode_helpers import greedy_logits

ALL_PAGES = LSAConfig(budget=None, max_pages=10_000, **SMALL_LSA)


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_lsa_cache_keeping_every_page_equals_full_attention(family):
    model = tiny_model(family)
    ids = torch.randint(0, model.config.vocab_size, (1, 203))
    ref_tokens, ref_logits = greedy_logits(model, ids, DynamicCache(config=model.config), 40)
    with LSACache(model, ALL_PAGES, max_new_tokens=50) as cache:
        tokens, logits = greedy_logits(model, ids, cache, 40)
        assert cache.stats.boundaries == 3
    assert torch.equal(tokens, ref_tokens)
    torch.testing.assert_close(logits, ref_logits, atol=1e-4, rtol=0)
    # and both equal one forward pass over the whole sequence
    whole = model(torch.cat([ids, tokens], 1)).logits[:, ids.shape[1] - 1 :]
    torch.testing.assert_close(logits, whole, atol=1e-4, rtol=0)


def test_batch_with_left_padding_equals_each_sequence_alone():
    model = tiny_model("llama")
    a = torch.randint(1, 200, (1, 260))
    b = torch.randint(1, 200, (1, 190))
    ids = torch.zeros(2, 260, dtype=torch.long)
    mask = torch.zeros_like(ids)
    ids[0], mask[0] = a, 1
    ids[1, 70:], mask[1, 70:] = b, 1
    lsa = LSAConfig(budget=None, max_pages=10_000, **SMALL_LSA)
    batch_tokens, stats = generate_ids(model, ids, mask, lsa=lsa, max_new_tokens=40)
    assert stats.boundaries >= 3
    for row, seq in enumerate((a, b)):
        alone, _ = generate_ids(model, seq, method="full", max_new_tokens=40)
        assert torch.equal(batch_tokens[row], alone[0])


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3", "mistral"])
def test_forced_resident_set_equals_masked_attention(family):
    model = tiny_model(family)
    ids = torch.randint(0, model.config.vocab_size, (1, 240))
    gen = torch.Generator().manual_seed(7)

    def forced(cache):
        n = cache.store.selectable_pages()
        k = cache.store.layout.num_page_slots
        return torch.randperm(n, generator=gen)[:k].view(1, -1)

    lsa = LSAConfig(budget=None, max_pages=5, **SMALL_LSA)
    resident = []
    with LSACache(model, lsa, max_new_tokens=60, forced_pages=forced) as cache:

        def record(step):
            pos = cache.store.slot_pos[0]
            resident.append(pos[pos >= 0].tolist())

        tokens, logits = greedy_logits(model, ids, cache, 50, on_step=record)
        assert cache.stats.boundaries == 4

    def reference_mask(step):
        length = ids.shape[1] + step + 1
        mask = torch.zeros(1, 1, 1, length, dtype=torch.bool)
        mask[0, 0, 0, resident[step]] = True
        return mask

    # Replay the same tokens through a full cache, masking everything LSA did not keep.
    cache = DynamicCache(config=model.config)
    out = model(input_ids=ids, past_key_values=cache, use_cache=True)
    ref = [out.logits[:, -1]]
    for step in range(tokens.shape[1]):
        out = model(input_ids=tokens[:, step : step + 1], past_key_values=cache, attention_mask=reference_mask(step))
        ref.append(out.logits[:, -1])
    torch.testing.assert_close(logits, torch.stack(ref, 1), atol=1e-4, rtol=0)
    full_tokens, _ = greedy_logits(model, ids, DynamicCache(config=model.config), 50)
    assert len(resident[0]) < ids.shape[1], "the forced set should leave tokens out"


def test_model_generate_accepts_lsa_cache():
    model = tiny_model("llama")
    ids = torch.randint(1, 200, (1, 300))
    lsa = LSAConfig(budget=0.5, **SMALL_LSA)
    ours, _ = generate_ids(model, ids, lsa=lsa, max_new_tokens=40)
    with LSACache(model, lsa, max_new_tokens=40) as cache:
        out = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            past_key_values=cache,
            max_new_tokens=40,
            do_sample=False,
            pad_token_id=0,
            eos_token_id=None,
        )
        assert cache.stats.boundaries >= 3
        assert cache.store.layout.num_page_slots < cache.store.selectable_pages()
    assert torch.equal(out[:, ids.shape[1] :], ours)


def test_recall_happens_only_at_cycle_boundaries():
    model = tiny_model("llama")
    ids = torch.randint(1, 200, (1, 400))
    lsa = LSAConfig(budget=0.4, **SMALL_LSA)
    with LSACache(model, lsa, max_new_tokens=80) as cache:
        greedy_logits(model, ids, cache, 80)
        steps = cache.store.log.copy_steps
        assert steps, "some pages must have been recalled"
        assert all(s % lsa.interval == 0 for s in steps), steps
        assert cache.stats.boundaries == 5


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_device_kv_stays_within_budget_at_2k(family):
    model = tiny_model(family)
    ids = torch.randint(1, 200, (1, 2048))
    for budget in (0.2, 0.25, 0.5):
        _, stats = generate_ids(model, ids, lsa=LSAConfig(budget=budget), max_new_tokens=70)
        full_at_context = stats.kv_bytes_full * 2048 // (2048 + stats.new_tokens)
        assert stats.kv_bytes_device <= budget * full_at_context + 1
        assert stats.kv_ratio <= budget
        assert stats.page_slots > 0


def test_pages_take_the_measured_size_of_the_backbone_unless_set(monkeypatch):
    model = tiny_model("llama")
    ids = torch.randint(1, 200, (1, 1024))
    monkeypatch.setitem(adapter.MEASURED_PAGE_CHUNKS, backbone_spec(model).shape_key, 2)
    layouts = {}
    for page_chunks in (None, 4):
        with LSACache(model, LSAConfig(budget=0.25, page_chunks=page_chunks), max_new_tokens=8) as cache:
            greedy_logits(model, ids, cache, 8)
            layouts[page_chunks] = (cache.lsa.page_chunks, cache.store.layout)
    (measured, small), (explicit, large) = layouts[None], layouts[4]
    assert (measured, explicit) == (2, 4)
    assert (small.page_size, large.page_size) == (32, 64)
    # the same budget holds about twice the pages of half the size
    assert small.num_page_slots >= 2 * large.num_page_slots - 1


def test_a_cache_decodes_exactly_the_tokens_it_was_built_for():
    model = tiny_model("llama")
    ids = torch.randint(1, 200, (1, 303))  # the tail starts page_size - 1 tokens before its recent 16: full length
    lsa = LSAConfig(budget=0.4, **SMALL_LSA)  # interval 16
    with LSACache(model, lsa, max_new_tokens=5) as cache:
        assert cache.lsa.tail_capacity_for(5) == lsa.tail_capacity - (lsa.interval - 5)
        greedy_logits(model, ids, cache, 5)
        assert cache.store.layout.tail_capacity == lsa.tail_capacity_for(5)
        with pytest.raises(RuntimeError, match="max_new_tokens it was built for"):
            model(input_ids=ids[:, :1], past_key_values=cache, use_cache=True)


def test_budget_too_small_is_a_clear_error():
    model = tiny_model("llama")
    ids = torch.randint(1, 200, (1, 512))
    with pytest.raises(BudgetError, match="cannot hold the always-resident part"):
        generate_ids(model, ids, lsa=LSAConfig(budget=0.05), max_new_tokens=8)


def test_lsa_cache_refuses_unsupported_attention():
    model = tiny_model("llama")
    model.config._attn_implementation = "flash_attention_2"
    with pytest.raises(ValueError, match="sdpa"):
        LSACache(model, LSAConfig())


def test_closed_cache_refuses_to_decode():
    model = tiny_model("llama")
    ids = torch.randint(1, 200, (1, 64))
    cache = LSACache(model, LSAConfig(budget=None, max_pages=100, **SMALL_LSA))
    cache.close()
    with pytest.raises(RuntimeError, match="closed"):
        model(input_ids=ids, past_key_values=cache, use_cache=True)


def test_follow_chunks_raises_the_scores_the_pages_are_chosen_from():
    from dataclasses import replace

    from flashmemory.indexer.scoring import follow_scores

    model = tiny_model("llama")
    ids = torch.randint(1, 200, (1, 400))
    lsa = LSAConfig(budget=0.4, **SMALL_LSA)
    seen = {}
    for follow in (0, 2):
        with LSACache(model, replace(lsa, follow_chunks=follow), max_new_tokens=8) as cache:
            greedy_logits(model, ids, cache, 8)
            seen[follow] = cache.last_scores
    assert torch.equal(seen[2], follow_scores(seen[0], 2))
    assert not torch.equal(seen[2], seen[0])


def test_an_unset_follower_count_is_the_backbones(monkeypatch):
    from flashmemory.indexer.scoring import follow_scores

    model = tiny_model("llama")
    ids = torch.randint(1, 200, (1, 400))
    monkeypatch.setitem(adapter.MEASURED_FOLLOW_CHUNKS, backbone_spec(model).shape_key, 2)
    seen = {}
    for follow in (None, 0):
        with LSACache(model, LSAConfig(budget=0.4, **SMALL_LSA, follow_chunks=follow), max_new_tokens=8) as cache:
            greedy_logits(model, ids, cache, 8)
            seen[follow] = (cache.lsa.follow_chunks, cache.last_scores)
    assert (seen[None][0], seen[0][0]) == (2, 0)  # a count that is set stays
    assert torch.equal(seen[None][1], follow_scores(seen[0][1], 2))
    assert backbone_spec(tiny_model("qwen2")).default_follow_chunks() == 0  # none measured for its shape


def test_chunks_inside_the_sink_never_win_a_page_slot():
    model = tiny_model("llama")
    ids = torch.randint(1, 200, (2, 400))
    lsa = LSAConfig(budget=0.4, **{**SMALL_LSA, "sink": 16})  # two chunks of 8 tokens
    with LSACache(model, lsa, max_new_tokens=4) as cache:
        greedy_logits(model, ids, cache, 4)
        in_sink = cache._sink_chunks(cache.last_scores.shape[1])
        assert int(in_sink[0].sum()) == lsa.sink // lsa.chunk_size
        assert float(cache.last_scores[in_sink].abs().sum()) == 0.0


def spy_on_token_keys(cache: LSACache) -> list:
    """Record the ``token_keys`` every indexer call of ``cache`` receives."""
    calls, score = [], cache.indexer.score

    def spy(*args, **kwargs):
        calls.append(kwargs.get("token_keys"))
        return score(*args, **kwargs)

    cache.indexer.score = spy
    return calls


def test_first_boundary_can_score_chunks_by_their_best_token():
    from dataclasses import replace

    model = tiny_model("llama")
    ids = torch.randint(1, 200, (1, 400))
    lsa = LSAConfig(budget=0.4, **SMALL_LSA)
    ref = DynamicCache(config=model.config)
    with torch.no_grad():
        model(ids, past_key_values=ref, use_cache=True)
    first = {}
    for mode in ("chunk", "token"):
        with LSACache(model, replace(lsa, first_boundary_keys=mode), max_new_tokens=40) as cache:
            calls = spy_on_token_keys(cache)
            greedy_logits(model, ids, cache, 1)
            first[mode] = cache.last_scores.clone()
            assert cache.token_keys_len is None  # later boundaries score chunk keys
            mirror = {layer: cache.store.mirror_k[layer].untyped_storage().data_ptr() for layer in cache.targets}
        if mode == "token":
            # the first boundary reads the prompt's keys at the indexer's layers from the host mirror: no copy of
            # them is held from the prefill
            assert len(calls) == 1 and len(calls[0]) == len(cache.targets)
            for held, layer in zip(calls[0], cache.targets, strict=True):
                assert held.untyped_storage().data_ptr() == mirror[layer]
                torch.testing.assert_close(held, ref.layers[layer].keys)
        else:
            assert calls == [None]
    assert not torch.equal(first["chunk"], first["token"])


def test_auto_first_boundary_keys_follow_the_prompt_length():
    from dataclasses import replace

    model = tiny_model("llama")
    ids = torch.randint(1, 200, (1, 400))
    lsa = LSAConfig(budget=0.4, **SMALL_LSA)
    scores = {}
    for name, cfg in {
        "chunk": replace(lsa, first_boundary_keys="chunk"),
        "token": replace(lsa, first_boundary_keys="token"),
        "auto_short": replace(lsa, first_boundary_keys="auto", token_keys_from=401),
        "auto_long": replace(lsa, first_boundary_keys="auto", token_keys_from=400),
    }.items():
        with LSACache(model, cfg, max_new_tokens=40) as cache:
            calls = spy_on_token_keys(cache)
            greedy_logits(model, ids, cache, 1)
            scores[name] = cache.last_scores.clone()
        assert (calls[0] is not None) == (name in ("token", "auto_long"))
    torch.testing.assert_close(scores["auto_short"], scores["chunk"], rtol=0, atol=0)
    torch.testing.assert_close(scores["auto_long"], scores["token"], rtol=0, atol=0)


def test_later_boundaries_can_score_token_keys_from_the_mirror():
    from dataclasses import replace

    model = tiny_model("llama")
    ids = torch.randint(1, 200, (1, 400))
    lsa = replace(LSAConfig(budget=0.4, **SMALL_LSA), first_boundary_keys="chunk")
    scores, held = {}, []
    for mode in ("chunk", "token"):
        with LSACache(model, replace(lsa, later_boundary_keys=mode), max_new_tokens=40) as cache:
            calls = spy_on_token_keys(cache)
            greedy_logits(model, ids, cache, lsa.interval + 1)  # up to the second boundary
            assert cache.stats.boundaries == 2
            scores[mode] = cache.last_scores.clone()
            if mode == "token":
                assert calls[0] is None and calls[1] is not None  # the first boundary as configured
                chunks = cache.chunk_keys.num_chunks
                for keys, layer in zip(calls[1], cache.targets, strict=True):
                    # every complete chunk's tokens, prompt and decoded, read from the mirror's own storage
                    assert keys.shape[-2] == chunks * lsa.chunk_size > ids.shape[1]
                    assert keys.untyped_storage().data_ptr() == cache.store.mirror_k[layer].untyped_storage().data_ptr()
                    held.append(keys)
            else:
                assert calls == [None, None]
    # the same query (both decoded alike up to here): a chunk's best token scores at least its mean key
    assert bool((scores["token"] >= scores["chunk"] - 1e-6).all()) and not torch.equal(scores["token"], scores["chunk"])
    assert held


def test_token_keys_only_at_the_first_boundary():
    from dataclasses import replace

    model = tiny_model("llama")
    ids = torch.randint(1, 200, (1, 400))
    lsa = replace(LSAConfig(budget=0.4, **SMALL_LSA), first_boundary_keys="token")
    with LSACache(model, lsa, max_new_tokens=40) as cache:
        calls = spy_on_token_keys(cache)
        greedy_logits(model, ids, cache, 40)
        assert cache.stats.boundaries == 3
    assert [c is not None for c in calls] == [True, False, False]
