"""Warm-up boundaries: extra page choices in a turn's first cycle, with the answer's first tokens in the query."""

import pytest
import torch

from flashmemory.attention.cache import LSACache
from flashmemory.attention.fast_path import FastLSACache
from flashmemory.config import LSAConfig, with_overrides
from flashmemory.models.tiny import tiny_model
from flashmemory.runtime.generate import generate_ids

from ..conftest import SMALL_LSA


def _ids(n: int, seed: int) -> torch.Tensor:
    return torch.randint(3, 250, (1, n), generator=torch.Generator().manual_seed(seed))


def _cache(model, lsa: LSAConfig, fast: bool, max_new_tokens: int):
    if fast:
        return FastLSACache(model, lsa, max_new_tokens=max_new_tokens, backend="torch")
    return LSACache(model, lsa, max_new_tokens=max_new_tokens)


def _decode(model, cache, ids: torch.Tensor, start: int, stop: int) -> None:
    """Feed tokens ``start .. stop-1`` one decode step each."""
    for i in range(start, stop):
        model(input_ids=ids[:, i : i + 1], past_key_values=cache, use_cache=True)


def _boundary_forwards(model, cache, ids: torch.Tensor, prompt: int) -> list[int]:
    """Decode forwards (1-based, after the prefill of ``prompt`` tokens) that started with a boundary."""
    model(input_ids=ids[:, :prompt], past_key_values=cache, use_cache=True)
    at, seen = [], 0
    for i in range(prompt, ids.shape[1]):
        predicted = cache.next_step_is_boundary() if isinstance(cache, FastLSACache) else None
        model(input_ids=ids[:, i : i + 1], past_key_values=cache, use_cache=True)
        if cache.stats.boundaries > seen:
            at.append(i - prompt + 1)
            seen = cache.stats.boundaries
        assert predicted in (None, bool(at and at[-1] == i - prompt + 1))
    return at


@pytest.mark.parametrize("fast", [False, True], ids=["masked", "fast-path"])
def test_warmup_boundaries_fall_after_the_listed_steps_then_the_cycle_runs_from_the_last(fast):
    model = tiny_model("llama")
    ids = _ids(240, seed=0)
    lsa = LSAConfig(budget=None, max_pages=2, warmup_steps=(1, 2, 4), **SMALL_LSA)
    with _cache(model, lsa, fast, 40) as cache:
        # the first boundary, then after 1, 2 and 4 steps, then every interval (16) steps from the last one
        assert _boundary_forwards(model, cache, ids, 200) == [1, 2, 3, 5, 21, 37]
    plain = LSAConfig(budget=None, max_pages=2, **SMALL_LSA)
    with _cache(model, plain, fast, 40) as cache:
        assert _boundary_forwards(model, cache, ids, 200) == [1, 17, 33]


def test_a_warmup_boundary_reads_the_answer_so_far():
    model = tiny_model("llama")
    ids = _ids(200, seed=1)
    # chunk keys at the first boundary too: a chunk's best token would floor every later chunk-key score
    lsa = LSAConfig(budget=None, max_pages=2, warmup_steps=(3,), first_boundary_keys="chunk", **SMALL_LSA)
    with LSACache(model, lsa, max_new_tokens=20) as cache:
        model(input_ids=ids[:, :190], past_key_values=cache, use_cache=True)
        _decode(model, cache, ids, 190, 193)
        first = cache.last_scores.clone()
        assert cache.stats.boundaries == 1 and cache.lookahead_pos[0, -1] == 192
        _decode(model, cache, ids, 193, 194)
        assert cache.stats.boundaries == 2
        now = cache.last_scores[..., : first.shape[-1]]
        # the answer's tokens move the scores, but never below what the question gave a chunk
        assert not torch.equal(now, first) and bool((now >= first).all())


def test_warmup_counts_from_the_turn_a_requested_boundary_starts():
    model = tiny_model("llama")
    ids = _ids(240, seed=2)
    lsa = LSAConfig(budget=None, max_pages=2, warmup_steps=(2,), **SMALL_LSA)
    with LSACache(model, lsa, max_new_tokens=40) as cache:
        model(input_ids=ids[:, :190], past_key_values=cache, use_cache=True)
        _decode(model, cache, ids, 190, 200)  # boundaries before forwards 1 and 3 of the first turn
        assert cache.stats.boundaries == 2
        cache.request_boundary()
        _decode(model, cache, ids, 200, 203)  # the requested boundary, then its warm-up one two steps later
        assert cache.stats.boundaries == 4 and cache.steps_in_cycle == 1


@pytest.mark.parametrize("fast", [False, True], ids=["masked", "fast-path"])
def test_warmup_boundaries_keep_decoding_exact_when_every_page_fits(fast):
    model = tiny_model("qwen2")
    ids = _ids(200, seed=3)
    full, _ = generate_ids(model, ids, method="full", max_new_tokens=30)
    lsa = LSAConfig(budget=None, max_pages=40, warmup_steps=(1, 2, 4, 8), **SMALL_LSA)
    caches = []

    def factory(m):
        caches.append(_cache(m, lsa, fast, 30))
        return caches[-1]

    out, stats = generate_ids(model, ids, max_new_tokens=30, cache_factory=factory)
    assert torch.equal(out, full) and stats.boundaries == caches[-1].stats.boundaries >= 5


@pytest.mark.parametrize("bad", [(0,), (16,), (4, 2), (2, 2)])
def test_warmup_steps_out_of_range_or_unordered_are_refused(bad):
    with pytest.raises(ValueError, match="warmup_steps"):
        LSAConfig(warmup_steps=bad, **SMALL_LSA)


def test_warmup_steps_from_a_command_line_setting():
    assert with_overrides(LSAConfig(), ["warmup_steps=1/2/4"]).warmup_steps == (1, 2, 4)
    assert with_overrides(LSAConfig(), ["warmup_steps=8"]).warmup_steps == (8,)
