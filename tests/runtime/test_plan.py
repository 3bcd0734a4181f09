"""Memory planning from a configuration: it must agree with what a real cache holds."""

import json

import pytest
import torch

from flashmemory.config import LSAConfig
from flashmemory.models.shapes import SHAPES, shape_config
from flashmemory.models.tiny import tiny_model
from flashmemory.runtime.generate import generate_ids
from flashmemory.runtime.plan import load_config, plan_memory, weight_bytes

LSA = LSAConfig(budget=0.3, chunk_size=8, page_chunks=2, recent=16, sink=4, interval=16)


@pytest.mark.parametrize("family", ["llama", "gemma3", "qwen2"])
@pytest.mark.parametrize("context, batch", [(500, 1), (900, 2)])
def test_the_plan_is_what_an_lsa_cache_holds(family, context, batch):
    model = tiny_model(family)
    ids = torch.randint(3, 256, (batch, context), generator=torch.Generator().manual_seed(context))
    tokens, stats = generate_ids(model, ids, method="lsa", lsa=LSA, indexer=None, max_new_tokens=20, eos_token_id=None)
    assert tokens.shape == (batch, 20)
    plan = plan_memory(model.config, LSA, context=context, max_new_tokens=20, batch=batch, dtype=torch.float32)
    assert plan.full_device_bytes == stats.kv_bytes_full
    assert plan.host_bytes == stats.kv_bytes_host
    assert plan.page_slots == stats.page_slots
    # a bound: the plan counts the chunk keys of every started chunk and a sliding layer's whole window
    assert 0.95 * plan.lsa_device_bytes <= stats.kv_bytes_device <= plan.lsa_device_bytes
    assert plan.weight_bytes == sum(p.numel() for p in model.parameters()) * 4


def test_the_plan_gives_the_host_mirror_bytes_locked_for_a_512k_and_a_128k_prompt_on_the_h200():
    # benchmarks/results/first_request_h200/: the pool's one block for each request, prompts of 524,324 and
    # 131,107 tokens (a 36-token question after the text), 16 new tokens, bf16
    cfg = shape_config("llama3-8b")
    assert plan_memory(cfg, LSAConfig(budget=0.15), context=524324, max_new_tokens=16).host_bytes == 68726292480
    assert plan_memory(cfg, LSAConfig(budget=0.15), context=131107, max_new_tokens=16).host_bytes == 17186553856


def test_a_budget_that_cannot_hold_the_fixed_part_is_reported_not_raised():
    plan = plan_memory(shape_config("qwen2.5-7b"), LSAConfig(budget=0.01), context=1000, max_new_tokens=8)
    assert plan.error is not None and "Raise the budget" in plan.error
    full, lsa = plan.max_batch(1e12)
    assert full > 0 and lsa == 0


def test_the_most_sequences_that_fit_count_weights_device_kv_and_host_mirrors():
    plan = plan_memory(shape_config("llama3-8b"), LSAConfig(budget=0.15), context=131072, max_new_tokens=256)
    gib = 2**30
    assert plan.max_batch(plan.weight_bytes + 3 * plan.full_device_bytes + 1) == (
        3,
        3 * plan.full_device_bytes // plan.lsa_device_bytes,
    )
    assert plan.max_batch(139 * gib, host_bytes=2.5 * plan.host_bytes)[1] == 2  # the host bounds LSA
    assert plan.max_batch(plan.weight_bytes - 1) == (0, 0)


def test_shapes_have_their_published_kv_sizes():
    gib = 2**30
    # a full bf16 cache of 128K tokens: 2 (K, V) x layers x KV heads x head dim x 2 bytes per token
    expected = {"llama3-8b": 16, "llama3-70b": 40, "qwen2.5-7b": 7, "qwen2.5-32b": 32, "mistral-7b": 16}
    assert set(expected) == set(SHAPES)
    for name, full_gib in expected.items():
        plan = plan_memory(load_config(name), context=131072 - 1, max_new_tokens=1)
        assert plan.full_device_bytes == full_gib * gib, name
    assert abs(weight_bytes(shape_config("llama3-8b"), torch.bfloat16) / 1e9 - 16.06) < 0.01  # 8.03B parameters


def test_bad_plans_are_refused():
    with pytest.raises(ValueError, match="must be >= 1"):
        plan_memory(shape_config("llama3-8b"), context=0)
    with pytest.raises(ValueError, match="Architectures known without files: llama3-8b"):
        load_config("no-such-model")


def test_a_config_json_path_is_read_without_weights(tmp_path):
    cfg = tiny_model("llama").config
    cfg.save_pretrained(tmp_path)
    assert load_config(str(tmp_path / "config.json")).num_hidden_layers == cfg.num_hidden_layers
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == "llama"


@pytest.mark.parametrize("context", [1024, 2048])
def test_the_plan_of_a_deepseek_v4_model_is_what_its_lsa_cache_holds(context):
    from flashmemory.deepseek_v4.cache import deepseek_v4_lsa_config
    from flashmemory.deepseek_v4.configs import tiny_deepseek_v4
    from flashmemory.deepseek_v4.generate import generate_ids as v4_generate_ids

    model = tiny_deepseek_v4()
    lsa = deepseek_v4_lsa_config(budget=0.8, recent=16, sink=8, interval=16, page_chunks=4)
    ids = torch.randint(3, 200, (1, context), generator=torch.Generator().manual_seed(context))
    _, stats = v4_generate_ids(model, ids, lsa=lsa, max_new_tokens=20, eos_token_id=None)
    plan = plan_memory(model.config, lsa, context=context, max_new_tokens=20, dtype=torch.float32)
    assert plan.full_device_bytes == stats.kv_bytes_full and plan.host_bytes == stats.kv_bytes_host
    assert plan.page_slots == stats.page_slots
    assert 0.95 * plan.lsa_device_bytes <= stats.kv_bytes_device <= plan.lsa_device_bytes


def test_the_deepseek_v4_flash_plan_is_the_recorded_accounting():
    # benchmarks/results/deepseek_v4_kv_accounting.md: budget 0.1, 1024 new tokens, MiB per sequence
    cfg = load_config("deepseek-v4-flash")
    mib = 2**20
    for context, full, lsa, pages in ((131072, 878.0, 86.0, 17), (1 << 20, 6898.0, 687.6, 196)):
        plan = plan_memory(cfg, LSAConfig(budget=0.1), context=context, max_new_tokens=1024)
        assert round(plan.full_device_bytes / mib, 1) == full and round(plan.lsa_device_bytes / mib, 1) == lsa
        assert plan.page_slots == pages


def test_the_package_exports_every_name_it_lists():
    import flashmemory as fm

    for name in fm.__all__:
        assert getattr(fm, name) is not None, name
    plan = fm.plan_memory(fm.load_config("llama3-8b"), fm.LSAConfig(budget=0.15), context=1 << 20)
    assert isinstance(plan, fm.MemoryPlan) and plan.host_bytes == plan.full_device_bytes
