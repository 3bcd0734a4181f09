"""kvpress peers: the package's own presses on tiny random models, with our transformers version."""

import importlib.util
import sys

import pytest
import torch
from transformers.cache_utils import DynamicCache
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from flashmemory.bench import methods as methods_mod
from flashmemory.bench.kv_budget import full_kv_bytes
from flashmemory.bench.kvpress_methods import PRESSES, KVPressMethod, pressed
from flashmemory.config import LSAConfig
from flashmemory.memory.layout import BudgetError
from flashmemory.models.adapter import attention_module
from flashmemory.models.tiny import tiny_model
from flashmemory.runtime.generate import generate_ids

if importlib.util.find_spec("kvpress") is None:
    pytest.fail("kvpress is not installed: pip install --no-deps kvpress==0.5.5 (the CI installs it)")

BUDGET = LSAConfig(chunk_size=8, page_chunks=2, interval=16, recent=16, sink=4, budget=0.25)
PROMPT = 256


class Tok:
    eos_token_id = 1


@pytest.fixture(scope="module")
def llama():
    return tiny_model("llama", num_layers=2)


def _prompt(n=PROMPT):
    return torch.randint(3, 250, (1, n), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("name", list(PRESSES))
def test_press_keeps_the_budget_of_the_prompt(llama, name):
    ids = _prompt()
    before = dict(ALL_ATTENTION_FUNCTIONS)
    out, stats = methods_mod.get_method(name).run(llama, Tok(), ids, torch.ones_like(ids), 8, BUDGET)
    n = stats.new_tokens
    kept = int(PROMPT * BUDGET.budget)  # kvpress keeps int(T * (1 - compression_ratio)) per layer
    # Physical bytes: the compressed prompt plus the decoded tokens (the last one is fed only if no EOS ended it).
    assert full_kv_bytes(llama, 1, kept + n - 1, 4) <= stats.kv_bytes_device <= full_kv_bytes(llama, 1, kept + n, 4)
    assert stats.kv_bytes_full == full_kv_bytes(llama, 1, PROMPT + n, 4)
    assert stats.method == name and len(out[0]) <= 8
    # Nothing global changed: attention functions untouched, no half-imported kvpress package left behind.
    assert dict(ALL_ATTENTION_FUNCTIONS) == before
    assert "kvpress" not in sys.modules or hasattr(sys.modules["kvpress"], "SnapKVPress")


def test_press_with_no_compression_decodes_like_full_attention(llama):
    ids = _prompt()
    ref, _ = generate_ids(llama, ids, None, method="full", max_new_tokens=8)
    press = KVPressMethod("snapkv").make_press(0.0)
    with pressed(press, llama):
        out, _ = generate_ids(llama, ids, None, method="full", max_new_tokens=8)
    assert torch.equal(out, ref)
    assert all(not hasattr(attention_module(llama, i), "rotary_emb") for i in range(2))


def test_press_compresses_at_prefill_only(llama):
    ids = _prompt()
    press = KVPressMethod("knorm").make_press(0.5)
    cache = DynamicCache(config=llama.config)
    with pressed(press, llama):
        generate_ids(
            llama,
            ids,
            None,
            method="full",
            max_new_tokens=5,
            eos_token_id=[],
            cache_factory=lambda m: cache,
        )
    # 128 prompt tokens kept, then every decode token appended (none evicted while decoding).
    assert [layer.keys.shape[2] for layer in cache.layers] == [128 + 5] * 2


def test_press_leaves_gemma3_sliding_layers_whole():
    model = tiny_model("gemma3", num_layers=3)
    ids = _prompt(200)
    _, stats = methods_mod.get_method("expected-attention").run(model, Tok(), ids, None, 4, BUDGET)
    assert 0 < stats.kv_bytes_device < stats.kv_bytes_full


def test_missing_kvpress_is_a_clear_error(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "kvpress" else real(name, *a))
    with pytest.raises(ValueError, match=r"method 'tova' needs the kvpress package: pip install --no-deps kvpress"):
        methods_mod.get_method("tova")


def test_press_holds_the_budget_with_a_follow_up_turn(llama):
    ids, turn = _prompt(), 20
    context = PROMPT - turn
    out, stats = methods_mod.get_method("snapkv").run(
        llama, Tok(), ids[:, :context], None, 8, BUDGET, followup=ids[:, context:]
    )
    n = stats.new_tokens
    kept = int(context * (BUDGET.budget * PROMPT - turn) / context)  # the turn's tokens come out of the budget
    assert full_kv_bytes(llama, 1, kept + turn + n - 1, 4) <= stats.kv_bytes_device
    assert stats.kv_bytes_device <= full_kv_bytes(llama, 1, kept + turn + n, 4)
    assert stats.kv_bytes_full == full_kv_bytes(llama, 1, PROMPT + n, 4)
    with pytest.raises(BudgetError, match="fewer than the"):
        methods_mod.get_method("snapkv").run(llama, Tok(), ids[:, :40], None, 8, BUDGET, followup=ids[:, 40:])
