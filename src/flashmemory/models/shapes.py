"""Configurations of public model architectures, without weights: for planning memory and for speed benchmarks.

Speed and memory at long contexts depend on a model's shapes, not on its weight values, so these configurations
(the published sizes of each model) stand in for models that are not on the machine: ``flashmemory plan`` reads
them, and the GPU benchmarks build random-weight models from them.
"""

from __future__ import annotations

from transformers import LlamaConfig, MistralConfig, PretrainedConfig, Qwen2Config

_LONG = 1 << 20  # planning and benchmarks go past the published windows; RoPE does not care at random weights


def _llama_like(cls, layers: int, hidden: int, inter: int, heads: int, vocab: int, theta: float, **extra):
    return cls(
        hidden_size=hidden,
        intermediate_size=inter,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=8,
        head_dim=128,
        vocab_size=vocab,
        max_position_embeddings=_LONG,
        rope_theta=theta,
        tie_word_embeddings=False,
        **extra,
    )


def _qwen25(layers: int, hidden: int, inter: int, heads: int, kv_heads: int) -> PretrainedConfig:
    return Qwen2Config(
        hidden_size=hidden,
        intermediate_size=inter,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        vocab_size=152064,
        max_position_embeddings=_LONG,
        rope_theta=1e6,
        tie_word_embeddings=False,
        use_sliding_window=False,
    )


SHAPES = {
    "llama3-8b": lambda layers=None: _llama_like(LlamaConfig, layers or 32, 4096, 14336, 32, 128256, 5e5),
    "llama3-70b": lambda layers=None: _llama_like(LlamaConfig, layers or 80, 8192, 28672, 64, 128256, 5e5),
    "qwen2.5-7b": lambda layers=None: _qwen25(layers or 28, 3584, 18944, 28, 4),
    "qwen2.5-32b": lambda layers=None: _qwen25(layers or 64, 5120, 27648, 40, 8),
    "mistral-7b": lambda layers=None: _llama_like(
        MistralConfig, layers or 32, 4096, 14336, 32, 32768, 1e6, sliding_window=None
    ),
}
"""Name -> a function making the configuration, with the published number of layers unless given another (a fresh
configuration per call: callers may edit it)."""


def shape_config(name: str, num_layers: int | None = None) -> PretrainedConfig:
    """The configuration of the architecture ``name`` (one of :data:`SHAPES`), optionally with fewer layers."""
    if name not in SHAPES:
        raise ValueError(f"unknown model shape {name!r}; known: {', '.join(SHAPES)}")
    return SHAPES[name](num_layers)


__all__ = ["SHAPES", "shape_config"]
