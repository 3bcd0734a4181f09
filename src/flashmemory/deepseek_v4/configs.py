"""DeepSeek-V4 configurations: the published DeepSeek-V4-Flash shape, and tiny random-weight models for tests."""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM, DeepseekV4Config, PreTrainedModel

from .spec import CSA, HCA, SLIDING

# DeepSeek-V4-Flash: layers 0-1 keep only the sliding window, then CSA (even) and HCA (odd) alternate.
FLASH_NUM_LAYERS = 43
FLASH_SHAPE = dict(
    vocab_size=129280,
    hidden_size=4096,
    moe_intermediate_size=2048,
    num_attention_heads=64,
    num_key_value_heads=1,
    head_dim=512,
    q_lora_rank=1024,
    o_groups=8,
    o_lora_rank=1024,
    index_n_heads=64,
    index_head_dim=128,
    index_topk=512,
    sliding_window=128,
    n_routed_experts=256,
    num_experts_per_tok=6,
    hc_mult=4,
    max_position_embeddings=1048576,
    compress_rope_theta=160000.0,
    rope_parameters={
        "rope_type": "yarn",
        "factor": 16.0,
        "original_max_position_embeddings": 65536,
        "beta_fast": 32,
        "beta_slow": 1,
    },
)


def flash_layer_types(num_layers: int = FLASH_NUM_LAYERS) -> list[str]:
    """The DeepSeek-V4-Flash attention schedule, cut to ``num_layers`` layers."""
    return [SLIDING if i < 2 else (CSA if i % 2 == 0 else HCA) for i in range(num_layers)]


def flash_config(num_layers: int = FLASH_NUM_LAYERS, *, num_experts: int | None = None) -> DeepseekV4Config:
    """A config with DeepSeek-V4-Flash's shape (attention, indexer, cache) and ``num_layers`` layers.

    Args:
        num_layers: decoder layers (43 in the released model); fewer keep random-weight checks small.
        num_experts: routed experts; fewer shrink the random weights without changing any KV shape.
    """
    kwargs = dict(FLASH_SHAPE, num_hidden_layers=num_layers, layer_types=flash_layer_types(num_layers))
    if num_experts is not None:
        kwargs.update(n_routed_experts=num_experts, num_experts_per_tok=min(6, num_experts))
    return DeepseekV4Config(**kwargs)


TINY_LAYER_TYPES = (SLIDING, CSA, HCA, CSA, CSA)


def tiny_deepseek_v4_config(
    *, num_layers: int = 5, index_topk: int = 8, sliding_window: int = 16, hca_rate: int = 16, vocab_size: int = 256
) -> DeepseekV4Config:
    """A DeepSeek-V4 config small enough to decode hundreds of tokens on a CPU in seconds.

    Layers follow :data:`TINY_LAYER_TYPES` (cycled); the CSA rate stays 4 as in the real model, the HCA rate
    and the sliding window are shrunk so short prompts already have compressed history, and ``index_topk`` is
    small so the lightning indexer really selects.
    """
    types = [TINY_LAYER_TYPES[i % len(TINY_LAYER_TYPES)] for i in range(num_layers)]
    return DeepseekV4Config(
        vocab_size=vocab_size,
        hidden_size=64,
        moe_intermediate_size=32,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=1,
        head_dim=32,
        q_lora_rank=32,
        n_routed_experts=4,
        num_experts_per_tok=2,
        layer_types=types,
        mlp_layer_types=["moe"] * num_layers,
        compress_rates={CSA: 4, HCA: hca_rate},
        hc_mult=2,
        # Sinkhorn iterations dominate a tiny model's step time; 3 keep the residual mixing well-formed.
        hc_sinkhorn_iters=3,
        sliding_window=sliding_window,
        o_groups=2,
        o_lora_rank=16,
        # 16 heads make an exact zero score (every head's ReLU at 0) rare, so top-k ties stay rare as in the
        # real model's 64 heads.
        index_n_heads=16,
        index_head_dim=16,
        index_topk=index_topk,
        partial_rotary_factor=0.25,
        max_position_embeddings=8192,
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=2,
    )


def tiny_deepseek_v4(
    *, seed: int = 0, dtype: torch.dtype = torch.float32, config: DeepseekV4Config | None = None, **kwargs
) -> PreTrainedModel:
    """A tiny random-weight ``DeepseekV4ForCausalLM`` in eval mode (eager attention, the only one V4 has).

    Args:
        seed: weights are a pure function of the seed and the config; the global RNG state is left untouched.
        dtype: parameter dtype.
        config: a config to build instead of :func:`tiny_deepseek_v4_config` (``kwargs`` go to that function).
    """
    config = config or tiny_deepseek_v4_config(**kwargs)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation="eager")
        # Random init leaves the compressors' position biases at zero; give them values so the gated pooling
        # is not a plain mean and a wrong window layout would show.
        for name, param in model.named_parameters():
            if name.endswith("position_bias"):
                param.data.normal_(0.0, 0.5)
    return model.to(dtype).eval()
