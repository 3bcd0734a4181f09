import torch
from transformers.cache_utils import DynamicCache

from flashmemory.deepseek_v4 import DeepseekV4LSACache, full_cache_bytes, lsa_cache_bytes
from flashmemory.deepseek_v4.accounting import layer_state_tensors, state_bytes
from flashmemory.deepseek_v4.configs import flash_config
from flashmemory.deepseek_v4.spec import deepseek_v4_spec
from flashmemory.memory.accounting import storage_bytes

from .helpers import MODEL, decode, small_lsa

SPEC = deepseek_v4_spec(MODEL)


def measured(cache) -> dict[str, int]:
    groups: dict[str, list] = {}
    for layer in cache.layers:
        for name, tensors in layer_state_tensors(layer).items():
            groups.setdefault(name, []).extend(tensors)
    return {name: storage_bytes(t) for name, t in groups.items()}


def test_full_cache_bytes_match_transformers_tensors():
    ids = torch.randint(3, 256, (2, 203))
    cache = DynamicCache(config=MODEL.config)
    decode(MODEL, ids, cache, 6)  # 209 tokens: 52 CSA entries, 13 HCA entries
    got, want = measured(cache), full_cache_bytes(SPEC, 209, elem=4, batch=2)
    for name in ("csa_entries", "csa_indexer_keys", "hca_entries", "sliding_window"):
        assert got[name] == getattr(want, name), name
    assert 0 < got["state"] <= want.compressor_state


def test_lsa_cache_bytes_match_its_tensors_and_stay_below_full():
    ids = torch.randint(3, 256, (1, 203))
    with DeepseekV4LSACache(MODEL, small_lsa(max_pages=3), max_new_tokens=32) as cache:
        decode(MODEL, ids, cache, 17)  # the 17th forward crosses the second boundary
        store = cache.store
        want = lsa_cache_bytes(SPEC, store.layout, cache.tokens_seen, num_targets=len(cache.targets), elem=4)
        got = measured(cache)
        assert storage_bytes(store.reserve_k.values()) == want.csa_entries
        assert storage_bytes(store.reserve_v.values()) == want.csa_indexer_keys
        assert storage_bytes(cache.chunk_keys.device_tensors()) <= want.memory_indexer_keys
        assert got["hca_entries"] == want.hca_entries and got["sliding_window"] == want.sliding_window
        assert got["csa_entries"] == got["csa_indexer_keys"] == 0  # nothing of the CSA history outside the store
        assert cache.device_kv_bytes() <= want.total < full_cache_bytes(SPEC, cache.tokens_seen, elem=4).total


def test_flash_shape_accounting_counts_every_component():
    spec = deepseek_v4_spec(flash_config())
    assert (len(spec.csa_layers), len(spec.hca_layers), len(spec.sliding_layers)) == (21, 20, 2)
    full = full_cache_bytes(spec, 1 << 20, elem=2)
    entries = 21 * (1 << 18)
    assert full.csa_entries == entries * 512 * 2 and full.csa_indexer_keys == entries * 128 * 2
    assert full.hca_entries == 20 * (1 << 13) * 512 * 2
    assert full.sliding_window == (2 * 2 + 41) * 128 * 512 * 2
    assert full.compressor_state == state_bytes(spec, 2)
