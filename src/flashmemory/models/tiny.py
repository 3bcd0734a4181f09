"""Tiny random-weight models of each supported family, for tests that must run in seconds on a CPU."""

from __future__ import annotations

import torch
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel

__all__ = ["TINY_FAMILIES", "tiny_model"]

TINY_FAMILIES: tuple[str, ...] = ("llama", "qwen2", "qwen3", "mistral", "gemma3")

# Every family gets grouped-query attention (2 query heads per KV head) like the real backbones.
_COMMON = dict(
    hidden_size=64,
    intermediate_size=128,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    max_position_embeddings=8192,
    # Real configs put these ids far beyond a tiny vocabulary (Qwen's eos is 151645).
    pad_token_id=0,
    eos_token_id=1,
    bos_token_id=2,
)
_GEMMA_SLIDING_WINDOW = 16
_GEMMA_GLOBAL_EVERY = 3


def _gemma_layer_types(num_layers: int) -> list[str]:
    types = ["full_attention" if (i + 1) % _GEMMA_GLOBAL_EVERY == 0 else "sliding_attention" for i in range(num_layers)]
    if "full_attention" not in types:
        # Keep at least one global layer, as every real Gemma 3 has, even in a 1-2 layer model.
        types[-1] = "full_attention"
    return types


def tiny_model(
    family: str,
    *,
    seed: int = 0,
    num_layers: int = 4,
    vocab_size: int = 256,
    dtype: torch.dtype = torch.float32,
) -> PreTrainedModel:
    """Build a small random causal LM of one family, in eval mode with SDPA attention.

    All families use hidden size 64, 4 query heads and 2 KV heads of dimension 16. ``gemma3`` is a
    ``gemma3_text`` model whose layers are sliding-window (window 16) except every third one, which is
    global; ``mistral`` has its sliding window disabled.

    Args:
        family: one of :data:`TINY_FAMILIES`.
        seed: weights are a pure function of ``(family, seed, num_layers, vocab_size)``; the global RNG
            state is left untouched.
        num_layers: number of decoder layers.
        vocab_size: vocabulary size (token ids 0, 1, 2 are pad, eos, bos).
        dtype: parameter dtype.

    Returns:
        The model (no tokenizer: feed token ids directly).
    """
    if family not in TINY_FAMILIES:
        raise ValueError(f"unknown tiny family {family!r}; choose one of {', '.join(TINY_FAMILIES)}")
    if num_layers < 1 or vocab_size < 3:
        raise ValueError("a tiny model needs num_layers >= 1 and vocab_size >= 3")
    kwargs: dict = dict(_COMMON, num_hidden_layers=num_layers, vocab_size=vocab_size)
    model_type = family
    if family == "gemma3":
        model_type = "gemma3_text"
        kwargs.update(
            sliding_window=_GEMMA_SLIDING_WINDOW,
            layer_types=_gemma_layer_types(num_layers),
            # Gemma scales queries by query_pre_attn_scalar**-0.5; the 256 default assumes head_dim 256.
            query_pre_attn_scalar=_COMMON["head_dim"],
        )
    elif family == "mistral":
        kwargs["sliding_window"] = None
    config = AutoConfig.for_model(model_type, **kwargs)
    # fork_rng: building a test model must not shift the random stream a test draws its inputs from.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation="sdpa")
    return model.to(dtype).eval()
