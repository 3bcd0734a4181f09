"""Which layers the zero-shot scorer reads by default, and how it combines them."""

from transformers import AutoConfig

from flashmemory.attention.cache import LSACache
from flashmemory.config import LSAConfig
from flashmemory.indexer.memory_indexer import MemoryIndexer
from flashmemory.models import adapter
from flashmemory.models.adapter import (
    DEFAULT_PAGE_CHUNKS,
    DEFAULT_TOKEN_KEYS_FROM,
    MEASURED_ZERO_SHOT_LAYERS,
    backbone_spec,
)
from flashmemory.models.tiny import tiny_model

from ..conftest import SMALL_LSA


def _config(model_type: str, layers: int, hidden: int, heads: int, kv_heads: int, **kw):
    return AutoConfig.for_model(
        model_type,
        num_hidden_layers=layers,
        hidden_size=hidden,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        intermediate_size=64,
        **kw,
    )


def test_default_layers_are_the_middle_band_of_the_depth():
    spec = backbone_spec(_config("llama", 30, 64, 4, 2))
    assert spec.default_target_layers() == tuple(range(13, 22))  # 45-70% of 30 layers
    assert spec.default_layer_reduce() == "mean"
    assert backbone_spec(_config("llama", 2, 64, 4, 2)).default_target_layers() == (0, 1)


def test_measured_shape_gets_its_measured_layer():
    qwen = _config("qwen2", 24, 896, 14, 2)
    assert backbone_spec(qwen).shape_key in MEASURED_ZERO_SHOT_LAYERS
    assert backbone_spec(qwen).default_target_layers() == (13,)
    # the same family at another depth is not the measured shape
    assert backbone_spec(_config("qwen2", 28, 896, 14, 2)).default_target_layers() == tuple(range(12, 20))


def test_token_keys_threshold_is_the_measured_one_of_the_shape(monkeypatch):
    assert DEFAULT_TOKEN_KEYS_FROM == 0  # token keys at every length
    smollm2 = _config("llama", 30, 576, 9, 3)
    assert backbone_spec(smollm2).default_token_keys_from() == 3072  # measured: chunk keys at 2K, token keys at 4K
    assert backbone_spec(_config("qwen2", 24, 896, 14, 2)).default_token_keys_from() == DEFAULT_TOKEN_KEYS_FROM
    monkeypatch.setitem(adapter.MEASURED_TOKEN_KEYS_FROM, ("llama", 32, 4096, 32, 8), 4096)
    assert backbone_spec(_config("llama", 32, 4096, 32, 8)).default_token_keys_from() == 4096
    assert backbone_spec(_config("llama", 32, 4096, 32, 4)).default_token_keys_from() == DEFAULT_TOKEN_KEYS_FROM


def test_sliding_layers_are_left_out_of_the_band():
    cfg = _config("gemma3_text", 12, 64, 4, 2, head_dim=16, sliding_window=32)
    spec = backbone_spec(cfg)
    assert set(spec.default_target_layers()) <= set(spec.full_layers)
    assert spec.default_target_layers()


def test_cache_reduces_the_default_layers_by_mean_and_explicit_layers_by_max():
    model = tiny_model("llama")
    default = LSACache(model, LSAConfig(budget=None, max_pages=4, **SMALL_LSA))
    explicit = LSACache(model, LSAConfig(budget=None, max_pages=4, target_layers=(1,), **SMALL_LSA))
    chosen = LSACache(model, LSAConfig(budget=None, max_pages=4, layer_reduce="max", **SMALL_LSA))
    assert default.targets == backbone_spec(model).default_target_layers() and default.layer_reduce == "mean"
    assert explicit.layer_reduce == "max" and chosen.layer_reduce == "max"
    for cache in (default, explicit, chosen):
        cache.close()


def test_cache_takes_the_reduction_a_checkpoint_records_unless_the_config_names_one():
    model = tiny_model("llama")
    layers = backbone_spec(model).default_target_layers()
    indexer = MemoryIndexer.from_model(model, layers, chunk_size=SMALL_LSA["chunk_size"])
    indexer.spec.trained = True
    caches = []
    for recorded, asked, expected in (("mean", None, "mean"), ("max", None, "max"), ("mean", "max", "max")):
        indexer.spec.layer_reduce = recorded
        caches.append(LSACache(model, LSAConfig(budget=None, max_pages=4, layer_reduce=asked, **SMALL_LSA), indexer))
        assert caches[-1].layer_reduce == expected, (recorded, asked)
    for cache in caches:
        cache.close()


def test_page_size_is_the_measured_one_of_the_shape(monkeypatch):
    assert DEFAULT_PAGE_CHUNKS == 4
    assert backbone_spec(_config("llama", 30, 576, 9, 3)).default_page_chunks() == 2  # SmolLM2: measured
    assert backbone_spec(_config("qwen2", 24, 896, 14, 2)).default_page_chunks() == DEFAULT_PAGE_CHUNKS
    monkeypatch.setitem(adapter.MEASURED_PAGE_CHUNKS, ("llama", 32, 4096, 32, 8), 8)
    assert backbone_spec(_config("llama", 32, 4096, 32, 8)).default_page_chunks() == 8
    assert backbone_spec(_config("llama", 32, 4096, 32, 4)).default_page_chunks() == DEFAULT_PAGE_CHUNKS
