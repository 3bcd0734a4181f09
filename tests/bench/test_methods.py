"""Oracle, Quest- and InfLLM-style methods on tiny random models; the method registry."""

import math

import pytest
import torch

from flashmemory.attention.block_select import BlockSelectCache, BlockSelectConfig
from flashmemory.attention.cache import LSACache
from flashmemory.bench import methods as methods_mod
from flashmemory.bench.infllm import InfLLMScorer
from flashmemory.bench.kv_budget import full_kv_bytes, lsa_page_tokens
from flashmemory.bench.oracle import golden_page_chooser
from flashmemory.bench.quest import QuestScorer
from flashmemory.config import LSAConfig
from flashmemory.models.adapter import backbone_spec
from flashmemory.models.tiny import tiny_model
from flashmemory.runtime.generate import generate_ids

SMALL = LSAConfig(chunk_size=8, page_chunks=2, interval=16, recent=16, sink=4, budget=0.3)


class Tok:
    eos_token_id = 1


def _prompt(n=300, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(3, 250, (1, n), generator=gen)


@pytest.fixture(scope="module")
def llama():
    return tiny_model("llama", num_layers=2)


def _decode_logits(model, ids, cache, steps=6):
    out = model(input_ids=ids, past_key_values=cache, use_cache=True)
    logits = [out.logits[:, -1]]
    for _ in range(steps):
        tok = logits[-1].argmax(-1, keepdim=True)
        out = model(input_ids=tok, past_key_values=cache, use_cache=True)
        logits.append(out.logits[:, -1])
    return torch.cat(logits)


@pytest.mark.parametrize("scorer", [QuestScorer, InfLLMScorer], ids=["quest", "infllm"])
def test_block_select_cache_with_every_block_equals_full_attention(llama, scorer):
    from transformers.cache_utils import DynamicCache

    ids = _prompt(200)
    with torch.no_grad():
        ref = _decode_logits(llama, ids, DynamicCache(config=llama.config))
        with BlockSelectCache(llama, BlockSelectConfig(8, num_blocks=1000, sink=4, recent=16), scorer()) as cache:
            out = _decode_logits(llama, ids, cache)
    assert cache.masked_steps == 0
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("scorer", [QuestScorer, InfLLMScorer], ids=["quest", "infllm"])
def test_block_select_mask_keeps_sink_top_blocks_and_recent(llama, scorer):
    cfg = BlockSelectConfig(block_size=8, num_blocks=5, sink=4, recent=16)
    ids = _prompt(203)
    with torch.no_grad(), BlockSelectCache(llama, cfg, scorer()) as cache:
        llama(input_ids=ids, past_key_values=cache, use_cache=True)
        layer = cache.scored_layers[0]
        assert cache.meta[layer][0].shape[2] == 203 // 8  # every complete block summarised
        query = torch.randn(1, 4, 16)
        mask = cache._decode_mask(layer, query, torch.float32)[:, :, 0]  # [B, Hq, T+1]
        assert mask.shape == (1, 4, 204)
        tail_start = (204 - 16) // 8 * 8
        assert mask[..., :4].all() and mask[..., tail_start:].all()
        history = mask[..., :tail_start].view(1, 4, -1, 8)
        assert (history.all(-1) | ~history.any(-1))[..., 1:].all()  # whole blocks only (block 0 holds the sink)
        chosen = history.all(-1)
        chosen[..., 0] = False  # the sink block is kept whatever the scorer says
        assert (chosen.sum(-1) == 5).all()
        # The chosen blocks are the scorer's best for each KV head (heads 2k, 2k+1 share KV head k).
        meta = [m[:, :, : tail_start // 8] for m in cache.meta[layer]]
        scores = cache.scorer.score(query.view(1, 2, 2, 16), meta).clone()
        scores[..., 0] = -math.inf
        best = torch.zeros_like(chosen[:, ::2])
        best.scatter_(-1, scores.topk(5, dim=-1).indices, True)
        assert torch.equal(chosen[:, ::2], best) and torch.equal(chosen[:, 1::2], best)


def test_quest_bound_is_an_upper_bound_of_every_logit():
    keys = torch.randn(2, 3, 7, 8, 16)  # [B, Hkv, n, b, D]
    query = torch.randn(2, 3, 2, 16)  # [B, Hkv, G, D]
    scorer = QuestScorer()
    bound = scorer.score(query, scorer.summarize(keys, None))  # [B, Hkv, n]
    exact = torch.einsum("bhgd,bhnjd->bhgnj", query, keys).amax(dim=(2, 4))
    assert (bound >= exact - 1e-5).all()
    one_token = keys[:, :, :, :1].expand_as(keys)  # a block of identical keys: the bound is exact
    torch.testing.assert_close(
        scorer.score(query, scorer.summarize(one_token, None)),
        torch.einsum("bhgd,bhnd->bhgn", query, one_token[:, :, :, 0]).amax(2),
    )


def test_infllm_representatives_are_the_most_attended_keys():
    b, d = 8, 4
    keys = torch.zeros(1, 1, 1, b, d)
    keys[0, 0, 0, :, 0] = torch.arange(b, dtype=torch.float32) * 0.1
    keys[0, 0, 0, 2, 1] = 5.0  # every query looks along dim 1: key 2 receives most, then key 6
    keys[0, 0, 0, 6, 1] = 4.0
    queries = torch.zeros(1, 2, 1, b, d)
    queries[..., 1] = 1.0
    (reps,) = InfLLMScorer(num_reps=2).summarize(keys, queries)  # [1, 1, 1, 2, D]
    assert {round(float(x), 1) for x in reps[0, 0, 0, :, 1]} == {5.0, 4.0}
    query = torch.zeros(1, 2, 1, d)
    query[0, 1, 0, 1] = 1.0  # only KV head 1 is interested, yet both heads get the same layer-wide score
    two = torch.cat([reps, reps * 0], dim=1)
    scores = InfLLMScorer().score(query, [two.expand(1, 2, 3, 2, d)])
    assert torch.equal(scores[:, 0], scores[:, 1])


@pytest.mark.parametrize("name", ["quest", "infllm"])
def test_block_methods_run_and_are_charged_the_whole_cache(llama, name):
    ids = _prompt(300)
    out, stats = methods_mod.get_method(name).run(llama, Tok(), ids, torch.ones_like(ids), 12, SMALL)
    assert len(out) == 1 and stats.new_tokens >= 1
    full = full_kv_bytes(llama, 1, 300 + stats.new_tokens, 4)
    assert stats.kv_bytes_full == full
    assert stats.kv_bytes_device > full  # every key and value, plus the block metadata
    block = SMALL.chunk_size if name == "quest" else SMALL.page_size
    assert stats.page_slots == lsa_page_tokens(llama, SMALL, 300, 12, 4) // block > 0


def test_block_method_refuses_padding(llama):
    ids = _prompt(100)
    mask = torch.ones_like(ids)
    mask[:, :3] = 0
    with pytest.raises(ValueError, match="unpadded"):
        methods_mod.get_method("quest").run(llama, Tok(), ids, mask, 4, SMALL)


def test_golden_page_chooser_ranks_pages_by_best_upcoming_chunk():
    class Store:
        layout = type("L", (), {"num_page_slots": 3})()
        step = 2

        def selectable_pages(self):
            return 6

    cache = type(
        "C",
        (),
        {"store": Store(), "lsa": LSAConfig(page_chunks=2), "selectable_pages": lambda s: s.store.selectable_pages()},
    )()
    # Steps 3 and 4 are the coming interval (2): page 2 holds one chunk 8 layers agree on, page 1 two chunks
    # with 5 each (more in total, weaker at best), page 4 one chunk with 3; chunk 100 is not selectable.
    golden = [torch.tensor([0, 1])] * 3 + [torch.tensor([2, 4]), torch.tensor([3, 9, 100])] + [torch.tensor([0])] * 9
    hits = [torch.full((len(g),), 3) for g in golden]
    hits[3], hits[4] = torch.tensor([5, 8]), torch.tensor([5, 3, 9])
    pages = golden_page_chooser(golden, hits, interval=2)(cache)
    assert pages.tolist() == [[2, 1, 4]]
    ones = [torch.ones(len(g), dtype=torch.long) for g in golden]
    assert golden_page_chooser(golden, ones, interval=2)(cache).tolist() == [[1, 4, 2]]  # then total, then newest
    far = golden_page_chooser(golden, hits, interval=20)(cache)  # later steps add chunk 0 (page 0) 9 x 3 hits
    assert far.tolist() == [[2, 1, 0]]
    cache.store.layout.num_page_slots = 5
    assert golden_page_chooser(golden, hits, interval=2)(cache).tolist() == [[2, 1, 4, 5, 3]]  # then recency


def test_oracle_runs_in_the_lsa_reserve(llama):
    ids = _prompt(300)
    lsa_out, lsa_stats = methods_mod.get_method("lsa-zeroshot").run(llama, Tok(), ids, None, 20, SMALL)
    out, stats = methods_mod.get_method("oracle").run(llama, Tok(), ids, None, 20, SMALL)
    assert stats.page_slots == lsa_stats.page_slots
    assert stats.kv_bytes_device == lsa_stats.kv_bytes_device
    assert stats.kv_ratio <= SMALL.budget + 1e-9
    assert stats.boundaries >= 1


def test_registry_names_every_method_and_refuses_unknown_ones():
    for name in ("oracle", "quest", "infllm", "snapkv", "streamingllm", "expected-attention", "tova", "keydiff"):
        assert name in methods_mod.METHODS and methods_mod.METHODS[name].kv_note
    with pytest.raises(ValueError, match="unknown method 'h2o'; valid methods: .*quest.*snapkv"):
        methods_mod.get_method("h2o")


def test_block_select_runs_on_gemma3_sliding_layers():
    model = tiny_model("gemma3", num_layers=3)
    ids = _prompt(200)
    with BlockSelectCache(model, BlockSelectConfig(8, 4, sink=4, recent=16), QuestScorer()) as cache:
        ids_out, _ = generate_ids(model, ids, None, method="full", max_new_tokens=6, cache_factory=lambda m: cache)
    assert cache.masked_steps > 0 and list(cache.meta) == cache.scored_layers == [2]
    assert ids_out.shape == (1, 6) or ids_out.shape[1] < 6


def test_peer_budgets_follow_the_chunk_keys_of_the_indexer_lsa_loads(monkeypatch):
    """A shipped checkpoint keys its own layers: the peers' matched budget is sized with them, like LSA's reserve."""
    from flashmemory.bench import kv_budget
    from flashmemory.indexer.memory_indexer import MemoryIndexer

    model = tiny_model("llama", num_layers=8)
    cfg = LSAConfig(chunk_size=8, page_chunks=2, interval=16, recent=16, sink=4, budget=0.4)
    default = len(backbone_spec(model).default_target_layers())
    assert default > 1
    zero_shot = kv_budget.sequence_bytes(model, cfg, 4)
    monkeypatch.setattr(kv_budget, "shipped_target_layers", lambda m: (7,))
    shipped = kv_budget.sequence_bytes(model, cfg, 4)
    assert zero_shot.per_chunk_key == default * shipped.per_chunk_key
    indexer = MemoryIndexer.from_model(model, (7,), chunk_size=8)
    with LSACache(model, cfg, indexer, max_new_tokens=12) as cache:
        assert cache.sequence_bytes(4) == shipped
