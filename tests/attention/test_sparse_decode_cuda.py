"""The Triton sparse decode kernel, device-side recall and CUDA-graph replay on a CUDA device."""

import pytest
import torch
import torch.nn.functional as F

from flashmemory.attention.cache import LSACache
from flashmemory.attention.fast_path import FastLSACache
from flashmemory.attention.sparse_decode import sparse_decode
from flashmemory.config import LSAConfig
from flashmemory.models.tiny import tiny_model
from flashmemory.runtime.graph_step import GraphDecodeStep

from ..conftest import SMALL_LSA
from .decode_helpers import decode_recording_commits, greedy_logits, masked_run_with_pages, random_pages
from .sparse_decode_cases import random_case

pytestmark = pytest.mark.cuda

SHAPES = [
    pytest.param(1, 1, 1, 16, 0, 16, 1, 16, id="mha-one-page"),
    pytest.param(2, 4, 2, 16, 4, 16, 3, 24, id="gqa2-ragged"),
    pytest.param(3, 8, 2, 64, 16, 32, 5, 63, id="gqa4-odd-tail"),
    pytest.param(2, 6, 3, 40, 5, 24, 4, 17, id="odd-head-dim-and-page"),
    pytest.param(4, 32, 8, 128, 16, 64, 60, 100, id="llama-heads"),
    pytest.param(2, 28, 4, 128, 16, 64, 300, 129, id="qwen-heads-long"),
    pytest.param(1, 32, 8, 128, 16, 64, 2000, 192, id="llama-128k-resident"),
]
BOUND = {torch.float32: 1e-5, torch.float16: 3e-3, torch.bfloat16: 1.5e-2}


def sdpa_over_valid_keys(q, k, v, rs):
    """scaled_dot_product_attention in fp32 over each sequence's valid slots (gathered)."""
    valid = rs.slot_positions(k.shape[2]) >= 0
    out = []
    for b in range(q.shape[0]):
        idx = valid[b].nonzero().squeeze(1)
        kb, vb = k[b][:, idx].float(), v[b][:, idx].float()
        qb = q[b].float().unsqueeze(1)  # [Hq, 1, D]
        out.append(F.scaled_dot_product_attention(qb[None], kb[None], vb[None], enable_gqa=True)[0, :, 0])
    return torch.stack(out)


def cuda_case(shape: tuple, dtype: torch.dtype, seed: int):
    """``random_case`` on the GPU for a ``(b, hq, hkv, d, sink, page, num_pages, tail_cap)`` shape."""
    b, hq, hkv, d, sink, page, num_pages, tail_cap = shape
    return random_case(
        b, hq, hkv, d, sink=sink, page=page, num_pages=num_pages, tail_cap=tail_cap, dtype=dtype, device="cuda",
        seed=seed,
    )  # fmt: skip


def poison_skipped_slots(k, v, rs):
    """``k`` and ``v`` with NaN in every slot the kernel must skip: reading any of them would poison the output."""
    skipped = ~(rs.slot_positions(k.shape[2]) >= 0)[:, None, :, None]
    return k.masked_fill(skipped, float("nan")), v.masked_fill(skipped, float("nan"))


@pytest.mark.parametrize("b, hq, hkv, d, sink, page, num_pages, tail_cap", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_sparse_decode_triton(b, hq, hkv, d, sink, page, num_pages, tail_cap, dtype):
    for seed in range(3):  # fresh random inputs and resident sets every time
        q, k, v, rs = cuda_case((b, hq, hkv, d, sink, page, num_pages, tail_cap), dtype, seed)
        ref = sdpa_over_valid_keys(q, k, v, rs)
        out = sparse_decode(q, *poison_skipped_slots(k, v, rs), rs, backend="triton")
        assert out.dtype == dtype and not out.isnan().any()
        err = float((out.float() - ref).norm() / ref.norm())
        assert err < BOUND[dtype], f"relative error {err:.2e}"


def test_sparse_decode_triton_strided_reserve_and_scale():
    q, k, v, rs = random_case(
        2, 8, 2, 64, sink=4, page=32, num_pages=6, tail_cap=40, dtype=torch.bfloat16, device="cuda", seed=5
    )
    big = torch.randn(2, 2, k.shape[2], 2, 64, device="cuda", dtype=torch.bfloat16)
    big[:, :, :, 0], big[:, :, :, 1] = k, v
    out = sparse_decode(q, big[:, :, :, 0], big[:, :, :, 1], rs, scale=0.05, backend="triton")
    ref = sparse_decode(q, k, v, rs, scale=0.05, backend="torch")
    assert float((out.float() - ref.float()).norm() / ref.float().norm()) < 1.5e-2


def test_sparse_decode_triton_inside_torch_compile_cuda():
    """Inductor re-emits the kernel with its own argument types (the scale as a float64 scalar); same output."""
    q, k, v, rs = random_case(
        2, 8, 2, 64, sink=4, page=32, num_pages=6, tail_cap=40, dtype=torch.bfloat16, device="cuda", seed=7
    )
    eager = sparse_decode(q, k, v, rs, backend="triton")
    compiled = torch.compile(lambda x: sparse_decode(x * 1.0, k, v, rs, backend="triton"))(q)
    assert float((compiled.float() - eager.float()).norm() / eager.float().norm()) < 1e-2


def test_fast_path_triton_equals_masked_path_cuda():
    model = tiny_model("llama").cuda()
    ids = torch.randint(0, model.config.vocab_size, (2, 240), device="cuda")
    lsa = LSAConfig(budget=None, max_pages=5, **SMALL_LSA)
    with LSACache(model, lsa, max_new_tokens=60, forced_pages=random_pages(7)) as cache:
        ref_tokens, ref_logits = greedy_logits(model, ids, cache, 50)
    with FastLSACache(model, lsa, max_new_tokens=60, forced_pages=random_pages(7), backend="triton") as cache:
        tokens, logits = greedy_logits(model, ids, cache, 50)
        cache.sync_stats()
        assert cache.store.mirror_k[0].is_pinned() and sum(cache.stats.pages_recalled) > 5
    assert torch.equal(tokens, ref_tokens)
    torch.testing.assert_close(logits, ref_logits, atol=1e-4, rtol=0)


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_graph_replayed_steps_equal_eager_steps_cuda(family):
    model = tiny_model(family).cuda()
    ids = torch.randint(0, model.config.vocab_size, (2, 240), device="cuda")
    lsa = LSAConfig(budget=None, max_pages=5, **SMALL_LSA)
    steps = 45  # crosses two boundaries after the capture: the graph must survive recall and tail slides
    with FastLSACache(model, lsa, max_new_tokens=60, forced_pages=random_pages(3), backend="triton") as cache:
        eager_tokens, eager_logits = greedy_logits(model, ids, cache, steps)
    with FastLSACache(model, lsa, max_new_tokens=60, forced_pages=random_pages(3), backend="triton") as cache:
        out = model(input_ids=ids, past_key_values=cache, use_cache=True)
        logits, runner = [out.logits[:, -1]], GraphDecodeStep(model, cache)
        pos = torch.full((2, 1), ids.shape[1], device="cuda")
        for step in range(steps):
            tok = eager_tokens[:, step : step + 1]  # feed the same tokens so every step is comparable
            logits.append(runner(tok, pos).clone())
            pos = pos + 1
        assert runner.replays > 30
    torch.testing.assert_close(torch.stack(logits, 1), eager_logits, atol=1e-5, rtol=0)


def test_graph_replay_with_prefetch_equals_eager_steps_and_overlaps_nothing_early_cuda():
    model = tiny_model("llama").cuda()
    ids = torch.randint(0, model.config.vocab_size, (2, 240), device="cuda")
    lsa = LSAConfig(budget=None, max_pages=6, prefetch_steps=5, prefetch_share=0.34, **SMALL_LSA)
    steps = 60  # three boundaries after the capture, each with its prefetch
    with FastLSACache(model, lsa, max_new_tokens=70, forced_pages=random_pages(4), backend="triton") as cache:
        eager_tokens, eager_logits, committed = decode_recording_commits(model, ids, cache, steps)
        cache.sync_stats()
        assert cache.stats.prefetches == 4 and cache.spare_slots == 2  # the fourth (step 59) is still pending
    # pages copied on the side stream ahead of their boundary hold the right keys and join exactly at it
    ref_tokens, ref_logits = masked_run_with_pages(model, ids, committed, max_pages=6, steps=steps)
    assert torch.equal(eager_tokens, ref_tokens)
    torch.testing.assert_close(eager_logits, ref_logits, atol=1e-4, rtol=0)
    with FastLSACache(model, lsa, max_new_tokens=70, forced_pages=random_pages(4), backend="triton") as cache:
        out = model(input_ids=ids, past_key_values=cache, use_cache=True)
        logits, runner = [out.logits[:, -1]], GraphDecodeStep(model, cache)
        pos = torch.full((2, 1), ids.shape[1], device="cuda")
        for step in range(steps):
            logits.append(runner(eager_tokens[:, step : step + 1], pos).clone())
            pos = pos + 1
        assert runner.replays > 40
    torch.testing.assert_close(torch.stack(logits, 1), eager_logits, atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    "splits, block_n, warps, stages, branchless",
    [(None, 64, 4, 2, True), (3, 32, 8, 1, True), (7, 64, 4, 3, True), (1, 32, 4, 1, False), (64, 64, 8, 3, False)],
)
def test_sparse_decode_launch_settings_agree_and_skip_empty_slots_cuda(splits, block_n, warps, stages, branchless):
    """Every tuning setting (the masked-load loop included) reads only valid slots and gives the same output."""
    from flashmemory.attention.sparse_decode_triton import sparse_decode_fwd

    for seed, shape in enumerate([(3, 8, 2, 64, 16, 32, 5, 63), (2, 28, 4, 128, 16, 64, 40, 129)]):
        q, k, v, rs = cuda_case(shape, torch.bfloat16, seed)
        d = shape[3]
        kp, vp = poison_skipped_slots(k, v, rs)
        out = sparse_decode_fwd(
            q,
            kp,
            vp,
            rs,
            d**-0.5,
            num_splits=splits,
            block_n=block_n,
            num_warps=warps,
            num_stages=stages,
            branchless=branchless,
        )
        ref = sdpa_over_valid_keys(q, k, v, rs)
        assert not out.isnan().any()
        assert float((out.float() - ref).norm() / ref.norm()) < BOUND[torch.bfloat16]
