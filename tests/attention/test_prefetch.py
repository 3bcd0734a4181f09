"""Prefetch: the next cycle's pages chosen ``prefetch_steps`` early and copied into spare slots."""

import pytest
import torch

from flashmemory.attention.cache import LSACache
from flashmemory.attention.fast_path import FastLSACache
from flashmemory.config import LSAConfig, with_overrides
from flashmemory.memory.async_store import limit_incoming, plan_moves
from flashmemory.models.tiny import tiny_model
from flashmemory.runtime.generate import generate_ids

from ..conftest import SMALL_LSA
from .decode_helpers import decode_recording_commits, masked_run_with_pages


def test_limit_incoming_caps_new_pages_and_refills_with_resident_ones():
    old = torch.tensor([[4, 5, -1, -1, 6, -1]])
    # wanted best first: 9 and 8 are new, 5 is resident, 7 is new
    wanted = torch.tensor([[9, 5, 8, 7, -1]])
    plan = limit_incoming(old, wanted, max_incoming=2, max_pages=4)
    kept = [int(p) for p in plan[0] if p >= 0]
    assert kept == [9, 5, 8, 4]  # 7 is the third new page: dropped; the free room goes to resident page 4
    plan = limit_incoming(old, wanted, max_incoming=1, max_pages=3)
    assert [int(p) for p in plan[0] if p >= 0] == [9, 5, 4]
    plan = limit_incoming(old, torch.tensor([[5, 6, 4, 9]]), max_incoming=3, max_pages=2)
    assert [int(p) for p in plan[0] if p >= 0] == [5, 6]  # never more than max_pages, in preference order


def test_plan_moves_into_empty_slots_only_leaves_leaving_pages_in_place():
    old = torch.tensor([[3, -1, 7, -1, 1]])
    new = torch.tensor([[7, 9, 2, -1]])
    table, moves = plan_moves(old, new, empty_only=True)
    # 9 and 2 go to the empty slots 1 and 3; slots 0 and 4 (pages 3 and 1 leave) are not written now
    assert moves.tolist() == [[-1, 9, -1, 2, -1]]
    assert table.tolist() == [[-1, 9, 7, 2, -1]]
    _, moves = plan_moves(old, new)  # a boundary's recall reuses the leaving slots first
    assert moves[0, 0] >= 0


def test_prefetch_settings_are_validated_and_need_the_fast_path():
    with pytest.raises(ValueError, match="prefetch_steps"):
        LSAConfig(interval=16, chunk_size=8, prefetch_steps=16)
    with pytest.raises(ValueError, match="prefetch_share"):
        LSAConfig(prefetch_share=1.0)
    assert with_overrides(LSAConfig(), ["prefetch_steps=8", "prefetch_share=0.5"]).prefetch_steps == 8
    model = tiny_model("llama")
    with pytest.raises(ValueError, match="needs the fast path"):
        LSACache(model, LSAConfig(prefetch_steps=4, **SMALL_LSA))


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_prefetched_cycles_attend_exactly_the_committed_pages(family):
    """Each cycle with prefetch equals the masked path forced to that cycle's committed page set.

    So the pages copied early hold the right keys, no step attends to a page before its boundary, and the pages
    leaving at a boundary stay readable until it.
    """
    model = tiny_model(family)
    ids = torch.randint(0, model.config.vocab_size, (2, 240))
    lsa = LSAConfig(budget=None, max_pages=6, prefetch_steps=5, prefetch_share=0.34, **SMALL_LSA)
    gen, from_tail = torch.Generator().manual_seed(5), []

    def newest_first(cache):  # the newest choosable page first, so that pages leaving the tail are chosen
        n, k, b = cache.selectable_pages(), cache.store.layout.num_page_slots, cache.store.batch
        from_tail.append((cache.store.selectable_pages(), n))
        rest = [torch.randperm(n - 1, generator=gen)[: k - 1] for _ in range(b)]
        return torch.cat([torch.full((b, 1), n - 1), torch.stack(rest)], 1)

    with FastLSACache(model, lsa, max_new_tokens=80, forced_pages=newest_first, backend="torch") as cache:
        tokens, logits, committed = decode_recording_commits(model, ids, cache, 70)
        cache.sync_stats()
        stats, spare = cache.stats, cache.spare_slots
        copy_steps = list(cache.store.log.copy_steps)
    assert spare == 2 and stats.boundaries == 5 and stats.prefetches == 4
    assert all(int((t >= 0).sum(1).max()) <= 6 - spare for t in committed)  # the spare slots stay free
    assert max(stats.pages_recalled[1:]) <= 2 * spare and sum(stats.pages_recalled[1:]) > 0  # counts sum the batch
    # after the first boundary, pages are copied only at prefetch steps, never at a boundary
    assert all(s % 16 == 16 - 5 for s in copy_steps[1:])
    # at each prefetch the page that leaves the tail at the coming boundary was choosable (copied from the tail)
    assert all(ahead > now for now, ahead in from_tail[1:])
    assert all(bool((t == ahead - 1).any(1).all()) for t, (_, ahead) in zip(committed[1:], from_tail[1:], strict=True))

    ref_tokens, ref_logits = masked_run_with_pages(model, ids, committed, max_pages=6, steps=70)
    assert torch.equal(tokens, ref_tokens)
    torch.testing.assert_close(logits, ref_logits, atol=1e-4, rtol=0)


def test_prefetch_through_generate_keeps_the_budget_and_the_spare_slots_free():
    model = tiny_model("llama")
    ids = torch.randint(1, 200, (2, 400))
    mask = torch.ones_like(ids)
    base = dict(budget=0.45, attention_backend="torch", **SMALL_LSA)
    plain, plain_stats = generate_ids(model, ids, mask, lsa=LSAConfig(**base), max_new_tokens=50)
    out, stats = generate_ids(model, ids, mask, lsa=LSAConfig(prefetch_steps=6, **base), max_new_tokens=50)
    assert out.shape == plain.shape
    assert stats.kv_bytes_device == plain_stats.kv_bytes_device  # the spare slots come out of the same reserve
    assert stats.boundaries == plain_stats.boundaries
    # the indexer's choice is made 6 steps early and capped, so the counts differ, but later boundaries copy
    assert len(stats.pages_recalled) == len(plain_stats.pages_recalled)  # the first boundary, then one per prefetch
    k = 7  # page slots per sequence at budget 0.45 here: the first boundary fills all of them without prefetch
    assert plain_stats.pages_recalled[0] == 2 * k
    spare = round(0.25 * k)
    assert stats.pages_recalled[0] == 2 * (k - spare)  # with prefetch the resident set leaves the spare slots free
    assert 0 < max(stats.pages_recalled[1:]) <= 2 * spare


def test_prefetch_stays_off_when_the_reserve_holds_every_page():
    model = tiny_model("llama")
    ids = torch.randint(1, 200, (2, 200))
    mask = torch.ones_like(ids)
    full, _ = generate_ids(model, ids, mask, method="full", max_new_tokens=40)
    # the request has 15 pages and the reserve 15 slots: sparing some would only lose pages
    lsa = LSAConfig(budget=None, max_pages=20, prefetch_steps=4, **SMALL_LSA)
    with FastLSACache(model, lsa, max_new_tokens=40, backend="torch") as cache:
        out = model(input_ids=ids, past_key_values=cache, use_cache=True)
        tokens = []
        for _ in range(40):
            tokens.append(out.logits[:, -1:].argmax(-1))
            out = model(input_ids=tokens[-1], past_key_values=cache, use_cache=True)
        assert cache.store.layout.num_page_slots == 15 and cache.spare_slots == 0 and cache.stats.prefetches == 0
    assert torch.equal(torch.cat(tokens, 1), full)
