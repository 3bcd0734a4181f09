"""Decode loop for DeepSeek-V4: the generic greedy loop with the V4 cache, and V4's own accounting."""

from __future__ import annotations

import torch
from torch import nn
from transformers.cache_utils import DynamicCache

from ..config import LSAConfig
from ..memory.accounting import storage_bytes
from ..runtime.generate import GenerationResult, copy_cycle_stats, decode_result, encode_prompts, prompt_list
from ..runtime.generate import generate_ids as generic_generate_ids
from ..runtime.sampling import Sampling, StopText
from ..runtime.stats import GenerationStats
from .accounting import layer_state_tensors
from .cache import DeepseekV4LSACache
from .memory_indexer import DeepseekV4MemoryIndexer

METHODS = ("lsa", "full")


def stock_cache_bytes(cache) -> int:
    """Storage bytes of every tensor transformers' own V4 cache holds (all layers, all components)."""
    return storage_bytes(t for layer in cache.layers for group in layer_state_tensors(layer).values() for t in group)


@torch.no_grad()
def generate_ids(
    model: nn.Module,
    input_ids: torch.Tensor,
    *,
    method: str = "lsa",
    lsa: LSAConfig | None = None,
    indexer: DeepseekV4MemoryIndexer | None = None,
    max_new_tokens: int = 64,
    eos_token_id: int | list[int] | None = None,
    forced_pages=None,
    on_token=None,
    sampling: Sampling | None = None,
    stop: StopText | None = None,
) -> tuple[torch.Tensor, GenerationStats]:
    """Decoding of a DeepSeek-V4 model with LSA on its CSA layers, or with transformers' own cache.

    Args:
        model: a ``DeepseekV4ForCausalLM``.
        input_ids: prompts of equal length (V4's compressors cannot skip padding). # [B, T]
        method: ``"lsa"`` or ``"full"``. Default: "lsa".
        lsa: LSA settings (tokens; ``chunk_size`` = CSA rate). Default: ``deepseek_v4_lsa_config()``.
        indexer: V4 Memory Indexer; ``None`` uses the zero-shot one (the native lightning indexers' query path).
        max_new_tokens: decode steps at most. Default: 64.
        eos_token_id: stop ids.
        forced_pages: ``(cache) -> [B, K]`` page ids instead of the indexer (tests, oracles).
        on_token: called with each step's tokens as they are chosen (see the generic ``generate_ids``).
        sampling: how each token is chosen (greedy by default), and ``stop``: stop strings per row, as in the
            generic ``generate_ids``.

    Returns:
        Generated ids ``[B, N]`` and the accounting (``kv_bytes_device``: peak storage of the device KV state,
        ``kv_bytes_full``: what transformers' cache holds at the final length).
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    holder: dict = {}

    def factory(m: nn.Module):
        if method == "full":
            holder["cache"] = DynamicCache(config=m.config)
        else:
            holder["cache"] = DeepseekV4LSACache(
                m, lsa, indexer, max_new_tokens=max_new_tokens, forced_pages=forced_pages
            )
        return holder["cache"]

    try:
        ids, stats = generic_generate_ids(
            model,
            input_ids,
            method=method,
            max_new_tokens=max_new_tokens,
            eos_token_id=eos_token_id,
            cache_factory=factory,
            on_token=on_token,
            sampling=sampling,
            stop=stop,
        )
    finally:
        if isinstance(holder.get("cache"), DeepseekV4LSACache):
            holder["cache"].close()
    cache = holder["cache"]
    if isinstance(cache, DeepseekV4LSACache):
        stats.kv_bytes_device = max(cache.stats.peak_device_bytes, cache.device_kv_bytes())
        stats.kv_bytes_full = cache.full_kv_bytes()
        copy_cycle_stats(stats, cache)
    else:
        # Entries only grow, so the final storage is the peak (the generic loop counts windows only).
        stats.kv_bytes_device = stats.kv_bytes_full = stock_cache_bytes(cache)
    return ids, stats


def generate(
    model: nn.Module,
    tokenizer,
    prompt: str | list[str],
    *,
    method: str = "lsa",
    lsa: LSAConfig | None = None,
    indexer: DeepseekV4MemoryIndexer | None = None,
    max_new_tokens: int = 64,
    chat: bool = True,
) -> GenerationResult:
    """Answer one prompt (or prompts of equal token length) with a DeepSeek-V4 model; see :func:`generate_ids`."""
    enc = encode_prompts(tokenizer, prompt_list(prompt), chat=chat)
    if not bool(enc["attention_mask"].bool().all()):
        raise ValueError("DeepSeek-V4 prompts of one batch must have the same number of tokens")
    eos = tokenizer.eos_token_id
    ids, stats = generate_ids(
        model,
        enc["input_ids"],
        method=method,
        lsa=lsa,
        indexer=indexer,
        max_new_tokens=max_new_tokens,
        eos_token_id=eos,
    )
    return decode_result(tokenizer, ids, stats)
