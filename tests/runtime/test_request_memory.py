"""A finished request frees its cache at once, by reference counting, without waiting for the cyclic collector.

generate_ids pauses the collector for a request on CUDA (so no collection can skew the allocator cross-check) and
no longer runs a full collection first: a cache held in a reference cycle would then keep its device memory and its
page-locked mirror until some later collection.
"""

import gc
import importlib
import weakref

import pytest
import torch

from flashmemory.attention.prefix import PrefixKV
from flashmemory.config import LSAConfig
from flashmemory.indexer.feedback import FeedbackSpec
from flashmemory.indexer.memory_indexer import zero_shot_indexer
from flashmemory.memory.pinned import HOST_POOL
from flashmemory.models.tiny import tiny_model

from ..conftest import SMALL_LSA

gen = importlib.import_module("flashmemory.runtime.generate")


@pytest.fixture
def caches(monkeypatch):
    """Weak references to every LSA cache generate_ids builds."""
    refs = []
    build = gen.build_lsa_cache

    def spy(*args, **kwargs):
        cache = build(*args, **kwargs)
        refs.append(weakref.ref(cache))
        return cache

    monkeypatch.setattr(gen, "build_lsa_cache", spy)
    return refs


def _run_without_collector(fn):
    was = gc.isenabled()
    gc.collect()
    gc.disable()
    try:
        return fn()
    finally:
        if was:
            gc.enable()


@pytest.mark.parametrize("family", ["llama", "gemma3"])
@pytest.mark.parametrize("with_head", [False, True], ids=["tower", "feedback_head"])
@pytest.mark.parametrize("with_prefix", [False, True], ids=["prompt", "prefix"])
def test_lsa_cache_is_freed_when_the_request_returns(caches, family, with_head, with_prefix):
    model = tiny_model(family)
    lsa = LSAConfig(budget=0.3, **SMALL_LSA)
    indexer = zero_shot_indexer(model, lsa)
    if with_head:
        indexer.add_feedback(FeedbackSpec())
    ids = torch.randint(3, 256, (1, 700), generator=torch.Generator().manual_seed(0))
    prefix = PrefixKV.capture(model, ids[:, :600]) if with_prefix else None
    rest = ids[:, 600:] if with_prefix else ids

    _run_without_collector(
        lambda: gen.generate_ids(model, rest, lsa=lsa, indexer=indexer, max_new_tokens=40, prefix=prefix)
    )
    assert len(caches) == 1
    assert caches[0]() is None, "the cache outlived its request: something holds it in a reference cycle"


def test_a_request_makes_no_cyclic_garbage():
    model = tiny_model("llama")
    ids = torch.randint(3, 256, (1, 500), generator=torch.Generator().manual_seed(1))
    for method in ("lsa", "full"):
        _run_without_collector(
            lambda m=method: gen.generate_ids(
                model, ids, method=m, lsa=LSAConfig(budget=0.3, **SMALL_LSA), max_new_tokens=30
            )
        )
        assert gc.collect() == 0


@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["mask", "triton"])
def test_mirror_block_returns_to_the_pool_without_a_collection_cuda(caches, backend):
    model = tiny_model("llama").cuda()
    ids = torch.randint(3, 256, (1, 3000), device="cuda")
    lsa = LSAConfig(budget=0.3, attention_backend=backend, **SMALL_LSA)
    gc.collect()
    leased = HOST_POOL.locked_bytes - HOST_POOL.free_bytes
    _, stats = _run_without_collector(lambda: gen.generate_ids(model, ids, lsa=lsa, max_new_tokens=20))
    assert stats.kv_bytes_host > 0 and caches[0]() is None
    # the request's mirror block is back in the pool (free for the next request), not held by a dead cache
    assert HOST_POOL.locked_bytes - HOST_POOL.free_bytes == leased


@pytest.mark.cuda
def test_collector_is_paused_only_during_a_cuda_request_and_restored_on_error_cuda():
    model = tiny_model("llama").cuda()
    ids = torch.randint(3, 256, (1, 300), device="cuda")
    seen = []

    def on_token(tok):
        seen.append(gc.isenabled())
        if len(seen) == 3:
            raise KeyboardInterrupt("the client went away")

    assert gc.isenabled()
    with pytest.raises(KeyboardInterrupt):
        gen.generate_ids(model, ids, lsa=LSAConfig(budget=0.3, **SMALL_LSA), max_new_tokens=10, on_token=on_token)
    assert seen == [False, False, False]
    assert gc.isenabled()


def test_collector_is_left_alone_on_the_cpu():
    model = tiny_model("llama")
    ids = torch.randint(3, 256, (1, 300))
    seen = []
    gen.generate_ids(
        model,
        ids,
        lsa=LSAConfig(budget=0.3, **SMALL_LSA),
        max_new_tokens=4,
        on_token=lambda t: seen.append(gc.isenabled()),
    )
    assert all(seen) and gc.isenabled()
