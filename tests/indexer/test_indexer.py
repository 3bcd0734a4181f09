import json
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from flashmemory.indexer.checkpoint import CheckpointError, blend_indexers, load_indexer, save_indexer
from flashmemory.indexer.chunk_keys import chunk_means
from flashmemory.indexer.memory_indexer import MemoryIndexer, covered_buckets, distance_buckets
from flashmemory.indexer.scoring import chunk_logits, follow_scores, select_pages
from flashmemory.models.adapter import apply_rope, attention_module, backbone_spec
from flashmemory.models.tiny import tiny_model


def capture_attention_inputs(model, layer, ids):
    """Hidden state entering ``layer``'s attention, and the keys it caches (post-RoPE)."""
    seen = {}
    attn = attention_module(model, layer)

    def pre(module, args, kwargs):
        seen["hidden"] = kwargs["hidden_states"]
        seen["cos_sin"] = kwargs["position_embeddings"]

    from transformers.cache_utils import DynamicCache

    handle = attn.register_forward_pre_hook(pre, with_kwargs=True)
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        model(ids, past_key_values=cache, use_cache=True)
    handle.remove()
    return seen, cache.layers[layer].keys


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3", "gemma3"])
def test_zero_shot_query_equals_the_layers_rotated_query(family):
    model = tiny_model(family)
    spec = backbone_spec(model)
    layer = spec.full_layers[-1]
    ids = torch.randint(0, model.config.vocab_size, (1, 37))
    seen, _ = capture_attention_inputs(model, layer, ids)
    indexer = MemoryIndexer.from_model(model, (layer,), chunk_size=8)
    attn = attention_module(model, layer)
    hidden = seen["hidden"][0]  # [T, hidden]
    q = attn.q_proj(hidden).view(hidden.shape[0], -1, spec.head_dim)
    if getattr(attn, "q_norm", None) is not None:
        q = attn.q_norm(q)
    cos, sin = seen["cos_sin"]
    half = spec.head_dim // 2
    rot = torch.cat([-q[..., half:], q[..., :half]], -1)
    expected = q * cos[0][:, None] + rot * sin[0][:, None]
    ours, _ = indexer.tower(0, hidden)
    ours = apply_rope(ours, torch.arange(hidden.shape[0]), indexer.inv_freq[0], indexer.spec.rope_scaling[0])
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=1e-4)


def test_building_the_zero_shot_indexer_draws_no_random_projection(monkeypatch):
    # the projections are always overwritten; drawing them first cost seconds per request at 8B shapes
    model = tiny_model("qwen2")
    layer = backbone_spec(model).full_layers[-1]

    real = torch.nn.init.kaiming_uniform_

    def refuse(tensor, *args, **kwargs):
        if tensor.device.type != "meta":  # a module built on meta draws nothing
            raise AssertionError("a query projection was randomly initialised")
        return real(tensor, *args, **kwargs)

    monkeypatch.setattr(torch.nn.init, "kaiming_uniform_", refuse)
    indexer = MemoryIndexer.from_model(model, (layer,), chunk_size=8)
    attn = attention_module(model, layer)
    torch.testing.assert_close(indexer.tower.q_proj[0].weight, attn.q_proj.weight.float())
    torch.testing.assert_close(indexer.tower.q_proj[0].bias, attn.q_proj.bias.float())


def test_zero_shot_logit_is_mean_attention_logit_per_chunk():
    model = tiny_model("llama")
    spec = backbone_spec(model)
    layer = spec.full_layers[-1]
    ids = torch.randint(0, model.config.vocab_size, (1, 64))
    seen, keys = capture_attention_inputs(model, layer, ids)
    indexer = MemoryIndexer.from_model(model, (layer,), chunk_size=8)
    hidden = seen["hidden"][:, -1]
    pos = torch.tensor([63])
    ck = chunk_means(keys, 0, 8, torch.zeros(1, dtype=torch.long))
    ours = indexer.layer_logits(0, hidden, pos, ck)  # [1, 8]
    q, _ = indexer.tower(0, hidden)
    q = apply_rope(q, pos, indexer.inv_freq[0], 1.0)[0]  # [H, D]
    group = spec.num_heads // spec.num_kv_heads
    k = keys[0].repeat_interleave(group, 0)  # [H, T, D]
    logits = torch.einsum("hd,htd->ht", q, k) / math.sqrt(spec.head_dim)
    per_chunk = logits.view(spec.num_heads, 8, 8).mean(-1)  # mean attention logit of each chunk
    expected = torch.relu(per_chunk).mean(0)
    torch.testing.assert_close(ours[0], expected, atol=1e-5, rtol=1e-4)


def test_chunk_means_ignores_padding():
    keys = torch.arange(2 * 1 * 8 * 2, dtype=torch.float32).view(2, 1, 8, 2)
    out = chunk_means(keys, 0, 4, torch.tensor([0, 3]))
    torch.testing.assert_close(out[0, 0, 0], keys[0, 0, :4].mean(0))
    torch.testing.assert_close(out[1, 0, 0], keys[1, 0, 3])
    torch.testing.assert_close(out[1, 0, 1], keys[1, 0, 4:].mean(0))


@settings(max_examples=60, deadline=None)
@given(
    num_pages=st.integers(1, 12),
    slots=st.integers(1, 6),
    page_chunks=st.integers(1, 4),
    seed=st.integers(0, 999),
)
def test_select_pages_keeps_best_chunks_then_densest_pages(num_pages, slots, page_chunks, seed):
    gen = torch.Generator().manual_seed(seed)
    scores = torch.rand(2, num_pages * page_chunks + 3, generator=gen)
    pages = select_pages(scores, num_selectable=num_pages, page_chunks=page_chunks, num_slots=slots, threshold=0.5)
    assert pages.shape == (2, slots)
    view = scores[:, : num_pages * page_chunks].view(2, num_pages, page_chunks)
    best = view.amax(-1)
    density = (view > 0.5).sum(-1).float() + best.clamp(max=0.999)
    k = min(slots, num_pages)
    m = (k + 1) // 2
    for b in range(2):
        chosen = [p for p in pages[b].tolist() if p >= 0]
        assert len(chosen) == k == len(set(chosen))
        by_best = best[b].argsort(descending=True)[:m].tolist()
        assert set(by_best) <= set(chosen), "pages holding the best chunks must be kept"
        others = [p for p in range(num_pages) if p not in chosen]
        rest = [p for p in chosen if p not in by_best]
        if others and rest:
            assert min(density[b, rest]) >= max(density[b, others]), "remaining slots go to the densest pages"


def test_select_pages_never_picks_padding_only_pages():
    scores = torch.ones(1, 8)
    valid = torch.tensor([[False, False, False, False, True, True, True, True]])
    pages = select_pages(scores, num_selectable=4, page_chunks=2, num_slots=3, threshold=0.5, valid_chunks=valid)
    assert sorted(p for p in pages[0].tolist() if p >= 0) == [2, 3]


def test_chunk_logits_shapes_and_relu():
    q = torch.randn(3, 6, 4, 8)
    w = torch.full((3, 6, 4), 0.25)
    keys = torch.randn(3, 2, 5, 8)
    out = chunk_logits(q, w, torch.tensor(0.0), keys)
    assert out.shape == (3, 6, 5)
    assert (out >= 0).all()
    # each window token is scored on its own
    torch.testing.assert_close(out[:, 2], chunk_logits(q[:, 2:3], w[:, 2:3], torch.tensor(0.0), keys)[:, 0])


def test_checkpoint_round_trip(tmp_path):
    model = tiny_model("qwen3")
    layers = tuple(backbone_spec(model).default_target_layers())
    indexer = MemoryIndexer.from_model(model, layers, chunk_size=8, backbone="tiny-qwen3", fingerprint="abc")
    save_indexer(indexer, tmp_path / "ck")
    loaded = load_indexer(tmp_path / "ck", fingerprint="abc")
    for (name, a), (_, b) in zip(indexer.state_dict().items(), loaded.state_dict().items(), strict=True):
        torch.testing.assert_close(a.float(), b.float(), msg=name)
    assert loaded.spec == indexer.spec


def test_checkpoint_fingerprint_mismatch_is_refused(tmp_path):
    model = tiny_model("llama")
    indexer = MemoryIndexer.from_model(model, (2,), chunk_size=8, backbone="tiny", fingerprint="abc")
    save_indexer(indexer, tmp_path / "ck")
    with pytest.raises(CheckpointError, match="fingerprint"):
        load_indexer(tmp_path / "ck", fingerprint="other")
    with pytest.warns(UserWarning, match="fingerprint"):
        load_indexer(tmp_path / "ck", fingerprint="other", strict=False)


def test_corrupt_checkpoint_is_a_clear_error(tmp_path):
    model = tiny_model("llama")
    path = save_indexer(MemoryIndexer.from_model(model, (2,), chunk_size=8), tmp_path / "ck")
    (path / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="corrupt"):
        load_indexer(path)
    (path / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="corrupt"):
        load_indexer(path)
    with pytest.raises(CheckpointError, match="not an indexer checkpoint"):
        load_indexer(tmp_path / "missing")


def test_checkpoint_can_store_its_matrices_in_half_precision(tmp_path):
    from safetensors.torch import load_file

    indexer = MemoryIndexer.from_model(tiny_model("llama"), (1, 2), chunk_size=8)
    with torch.no_grad():
        indexer.distance_bias.normal_()
    full = save_indexer(indexer, tmp_path / "full")
    half = save_indexer(indexer, tmp_path / "half", half_matrices=True)
    stored = load_file(half / "model.safetensors")
    assert stored["tower.q_proj.0.weight"].dtype == torch.float16
    assert stored["inv_freq"].dtype == stored["distance_bias"].dtype == torch.float32  # angles and prior exact
    assert (half / "model.safetensors").stat().st_size < 0.6 * (full / "model.safetensors").stat().st_size
    loaded = load_indexer(half)
    for name, value in indexer.state_dict().items():
        got = loaded.state_dict()[name]
        assert got.dtype == torch.float32, name
        if stored[name].dtype == torch.float16:
            torch.testing.assert_close(got, value.half().float(), msg=name)
        else:
            assert torch.equal(got, value), name


def test_checkpoint_records_its_layer_reduction_and_older_ones_read_as_max(tmp_path):
    model = tiny_model("llama")
    indexer = MemoryIndexer.from_model(model, (1, 2), chunk_size=8)
    indexer.spec.layer_reduce = "mean"
    path = save_indexer(indexer, tmp_path / "ck")
    assert load_indexer(path).spec.layer_reduce == "mean"
    meta = json.loads((path / "config.json").read_text())
    del meta["spec"]["layer_reduce"]  # as written before checkpoints recorded it: they were all trained by max
    (path / "config.json").write_text(json.dumps(meta))
    assert load_indexer(path).spec.layer_reduce == "max"
    meta["spec"]["layer_reduce"] = "sum"
    (path / "config.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="corrupt.*layer_reduce"):
        load_indexer(path)


def test_blend_walks_from_start_to_end_in_weight_space_and_refuses_other_shapes(tmp_path):
    model = tiny_model("llama")
    start = MemoryIndexer.from_model(model, (2,), chunk_size=8, backbone="tiny", fingerprint="abc")
    end = MemoryIndexer.from_model(model, (2,), chunk_size=8, backbone="tiny", fingerprint="abc")
    with torch.no_grad():
        for p in end.parameters():
            p.add_(torch.randn_like(p))
    end.spec.trained = True
    end.spec.prior_buckets = 30  # set by training; the zero-shot start has none
    end.spec.layer_reduce = "mean"  # chosen for training: the blend scores as the trained end was trained to
    save_indexer(start, tmp_path / "a")
    save_indexer(end, tmp_path / "b", extra={"training": {"epochs": 3}})
    for w in (0.0, 0.25, 1.0):
        got = load_indexer(blend_indexers(tmp_path / "a", tmp_path / "b", w, tmp_path / f"w{w}"), fingerprint="abc")
        for name, v in got.state_dict().items():
            a, b = start.state_dict()[name], end.state_dict()[name]
            torch.testing.assert_close(v, a + w * (b - a), msg=name)
        assert got.spec.trained and got.spec.prior_buckets == 30 and got.spec.layer_reduce == "mean"
    meta = json.loads((tmp_path / "w0.25" / "config.json").read_text())
    assert meta["blend"]["weight"] == 0.25 and meta["training"] == {"epochs": 3}
    other = MemoryIndexer.from_model(model, (1,), chunk_size=8, backbone="tiny", fingerprint="abc")
    save_indexer(other, tmp_path / "c")
    with pytest.raises(CheckpointError, match="target_layers"):
        blend_indexers(tmp_path / "a", tmp_path / "c", 0.5, tmp_path / "bad")
    with pytest.raises(ValueError, match="weight"):
        blend_indexers(tmp_path / "a", tmp_path / "b", 1.5, tmp_path / "bad")
    assert not (tmp_path / "bad").exists()


def test_follow_scores_lends_a_chunk_score_to_the_chunks_after_it():
    s = torch.tensor([[0.1, 0.9, 0.2, 0.3, 0.05]])
    assert torch.equal(follow_scores(s, 0), s)
    assert torch.allclose(follow_scores(s, 1), torch.tensor([[0.1, 0.9, 0.9, 0.3, 0.3]]))
    assert torch.allclose(follow_scores(s, 2), torch.tensor([[0.1, 0.9, 0.9, 0.9, 0.3]]))
    assert torch.allclose(follow_scores(s, 10), torch.tensor([[0.1, 0.9, 0.9, 0.9, 0.9]]))


def test_follow_scores_recalls_the_page_after_a_match_at_a_page_end():
    # the best chunk (id 3) ends page 0; the page after it holds the value the query needs
    s = torch.tensor([[0.2, 0.2, 0.2, 0.95, 0.1, 0.1, 0.1, 0.1, 0.5, 0.1, 0.1, 0.1]])
    kw = dict(num_selectable=3, page_chunks=4, num_slots=2, threshold=0.5)
    assert select_pages(s, **kw).tolist() == [[0, 2]]
    assert select_pages(follow_scores(s, 1), **kw).tolist() == [[0, 1]]


def test_follow_chunks_must_not_be_negative():
    from flashmemory import LSAConfig

    with pytest.raises(ValueError, match="follow_chunks"):
        LSAConfig(follow_chunks=-1)


def test_token_chunk_logits_is_the_best_token_of_each_chunk():
    from flashmemory.indexer.scoring import chunk_logits, token_chunk_logits

    b, w, h, hkv, d, c, n = 2, 3, 4, 2, 8, 4, 5
    q, wt, bias = torch.randn(b, w, h, d), torch.rand(b, w, h), torch.tensor(0.1)
    keys = torch.randn(b, hkv, n * c + 3, d)  # the last, incomplete chunk is not scored
    pad = torch.tensor([0, 6])
    got = token_chunk_logits(q, wt, bias, keys, c, n, pad, block_chunks=2)
    per_token = chunk_logits(q, wt, bias, keys[:, :, : n * c])  # [B, W, n*C]
    per_token[1, :, :6] = float("-inf")
    torch.testing.assert_close(got, per_token.view(b, w, n, c).amax(-1))
    assert torch.isinf(got[1, :, 0]).all() and torch.isfinite(got[1, :, 1:]).all()  # chunk 0 of row 1: padding
    # one token per chunk: a chunk's key is its token's key, and both scorers agree
    torch.testing.assert_close(
        token_chunk_logits(q, wt, bias, keys, 1, n * c), chunk_logits(q, wt, bias, keys[:, :, : n * c])
    )


def test_covered_buckets_stop_at_the_first_bucket_training_reached_only_in_part():
    c = 16
    assert covered_buckets(0, c) == 1 and covered_buckets(-1, c) == 0
    last_of_34 = int((distance_buckets(torch.arange(1000) * c, c) == 34).nonzero().max())  # in chunks
    assert covered_buckets(last_of_34 * c, c) == 35  # bucket 34 seen whole
    assert covered_buckets((last_of_34 - 1) * c, c) == 34  # its last chunk distance never seen
    assert covered_buckets(10**7, c) == 48  # the last bucket takes every farther distance anyway


def test_prior_past_its_reach_uses_the_last_covered_bucket():
    model = tiny_model("llama")
    indexer = MemoryIndexer.from_model(model, (1,), chunk_size=4)
    with torch.no_grad():
        indexer.distance_bias.copy_(torch.arange(48.0)[None])  # bias = bucket number
    positions = torch.tensor([[4000]])
    free = indexer._distance_prior(0, positions, 1000, None).detach()
    assert float(free.max()) > 20  # far chunks reach far buckets, so the clamp below can fail
    indexer.spec.prior_buckets = 20
    clamped = indexer._distance_prior(0, positions, 1000, None)
    torch.testing.assert_close(clamped, free.clamp(max=19.0))
