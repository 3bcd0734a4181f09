"""The decode loop: prefill with full attention, then LSA cycles (or a plain full cache for comparison)."""

from __future__ import annotations

import functools
import gc
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from transformers.cache_utils import DynamicCache

from ..attention.cache import LSACache
from ..attention.cycle import LSACycle
from ..attention.fast_path import FastLSACache, build_lsa_cache
from ..attention.prefix import PrefixKV
from ..config import LSAConfig
from ..indexer.memory_indexer import MemoryIndexer
from ..indexer.shipped import resolve_indexer
from ..memory.accounting import storage_bytes
from .graph_step import GraphDecodeStep, graph_replay_refusal
from .sampling import Sampling, StopText
from .stats import GenerationStats

METHODS = ("lsa", "full")


@dataclass(slots=True)
class GenerationResult:
    """Output of :func:`generate`.

    Args:
        texts: decoded continuation per prompt.
        token_ids: generated ids per prompt (up to and excluding EOS).
        stats: time and memory accounting.
    """

    texts: list[str]
    token_ids: list[list[int]]
    stats: GenerationStats

    @property
    def text(self) -> str:
        return self.texts[0]


def prompt_list(prompt: str | list[str]) -> list[str]:
    """One prompt or a list of them as a list; an empty prompt is an error."""
    prompts = [prompt] if isinstance(prompt, str) else list(prompt)
    if not prompts or any(not p.strip() for p in prompts):
        raise ValueError("prompt is empty")
    return prompts


def encode_prompts(tokenizer, prompts: list[str], *, chat: bool) -> dict[str, torch.Tensor]:
    """Tokenise prompts with left padding (and the chat template when asked and available)."""
    if chat and getattr(tokenizer, "chat_template", None):
        prompts = [
            tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
            for p in prompts
        ]
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    return tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=not chat)


def _collector_paused(fn):
    """Run ``fn(model, ...)`` with Python's cyclic garbage collector paused when the model is on CUDA.

    The allocator cross-check counts the bytes allocated during the request: a collection inside it that freed an
    earlier request's garbage would skew it. A full collection up front prevented that, but took 0.2-0.3 s per
    request in a process holding a large model. Caches here free by reference counting (they hold no cycles), and a
    request makes no cyclic garbage, so pausing the collector for its duration keeps the count exact for free.
    """

    @functools.wraps(fn)
    def run(model: nn.Module, *args, **kwargs):
        if not gc.isenabled() or next(model.parameters()).device.type != "cuda":
            return fn(model, *args, **kwargs)
        gc.disable()
        try:
            return fn(model, *args, **kwargs)
        finally:
            gc.enable()

    return run


@_collector_paused
@torch.no_grad()
def generate_ids(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    *,
    method: str = "lsa",
    lsa: LSAConfig | None = None,
    indexer: MemoryIndexer | None = None,
    max_new_tokens: int = 64,
    eos_token_id: int | list[int] | None = None,
    cache_factory=None,
    followup_ids: torch.Tensor | None = None,
    cuda_graph: bool | None = None,
    on_token: Callable[[torch.Tensor], None] | None = None,
    prefix: PrefixKV | None = None,
    sampling: Sampling | None = None,
    stop: StopText | None = None,
) -> tuple[torch.Tensor, GenerationStats]:
    """Decoding from token ids with LSA or a full cache (greedy unless ``sampling`` says otherwise).

    Args:
        model: causal LM.
        input_ids: left-padded prompts. # [B, T]
        attention_mask: 1 for real tokens. # [B, T]
        method: ``"lsa"`` or ``"full"``.
        lsa: LSA settings (``method="lsa"``). Default: ``LSAConfig()``.
        indexer: Memory Indexer; ``None`` uses the zero-shot one.
        max_new_tokens: decode steps at most.
        eos_token_id: stop ids; a finished sequence keeps emitting its first EOS.
        cache_factory: optional ``(model) -> Cache`` overriding the cache; it must hold ``max_new_tokens`` plus
            the follow-up's tokens after the prompt.
        followup_ids: a second turn that arrives after the prompt has been prefilled (a question after a long
            document): fed one token per decode step through the cache, ignoring the model's own predictions, before
            greedy decoding starts. An LSA cache starts a new cycle before the turn's last token, so the answer is
            read with pages chosen for the turn. Without left padding only. # [B, F]
        cuda_graph: replay the decode steps between boundaries from one captured CUDA graph
            (:class:`GraphDecodeStep`); needs ``method="lsa"`` on the fast path on a CUDA device, with every decoder
            layer full attention. Boundary steps run eagerly. True requires it (refused before the prefill), False
            decodes eagerly, None replays whenever it can run (a fast-path LSA cache on CUDA). Default: None.
        on_token: called with each step's tokens as they are chosen (for streaming); an exception it raises stops
            decoding and is raised from here, with the cache closed. # [B]
        prefix: keys and values of the prompt's first tokens, captured before (:class:`PrefixKV`); ``input_ids``
            are then the rest of the prompt, prefilled against it, and the answer is the one the whole prompt
            gives. Unpadded prompts only.
        sampling: how each token is chosen (:class:`~flashmemory.runtime.sampling.Sampling`). Default: greedy.
        stop: stop strings per row (:class:`~flashmemory.runtime.sampling.StopText`): a row whose text reaches one
            ends there, as at an EOS; ``stop.cut`` then gives its tokens and text. Default: None.

    Returns:
        Generated ids ``[B, N]`` and the accounting.
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    device = next(model.parameters()).device
    input_ids = input_ids.to(device)
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    attention_mask = attention_mask.to(device)
    batch, context = input_ids.shape
    if prefix is not None:
        if cache_factory is not None:
            raise ValueError("a prefix builds its own cache: pass cache_factory or prefix, not both")
        if not bool(attention_mask.bool().all()):
            raise ValueError("a prefix continues unpadded prompts only")
        context += prefix.length
        attention_mask = torch.ones(batch, context, dtype=attention_mask.dtype, device=device)
    followup = _followup(followup_ids, input_ids, attention_mask)
    stats = GenerationStats(method=method, batch_size=batch, context_tokens=context + followup.shape[1])
    allocated_before = None
    if device.type == "cuda":
        allocated_before = torch.cuda.memory_allocated(device)
    # asked before the cache exists: a fast-path cache swaps the model's attention implementation while it lives
    replayable = cuda_graph is None and graph_replay_refusal(model, method, lsa) is None
    if cache_factory is not None:
        cache = cache_factory(model)
    elif method == "lsa":
        steps = max_new_tokens + followup.shape[1]
        cache = build_lsa_cache(model, lsa or LSAConfig(), indexer, max_new_tokens=steps, prefix=prefix)
    elif prefix is not None:
        cache = prefix.dynamic_cache(model)
    else:
        cache = DynamicCache(config=model.config)
    # unasked, only a fast-path cache is replayed (a cache_factory's may be another); True is checked by the step
    replays = cuda_graph if cuda_graph is not None else replayable and isinstance(cache, FastLSACache)
    graph = GraphDecodeStep(model, cache) if replays else None
    stops = torch.tensor(_as_list(eos_token_id), device=device, dtype=torch.long)
    # with a prefix the mask's first columns are tokens the cache already holds
    positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -input_ids.shape[1] :]
    try:
        t0 = time.perf_counter()
        out = model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=positions,
            past_key_values=cache,
            use_cache=True,
            logits_to_keep=1,
        )
        _sync(device)
        stats.prefill_seconds = time.perf_counter() - t0
        if allocated_before is not None:
            stats.allocator_kv_bytes = torch.cuda.memory_allocated(device) - allocated_before
            torch.cuda.reset_peak_memory_stats(device)
        next_pos = positions[:, -1:] + 1
        t0 = time.perf_counter()
        for i in range(followup.shape[1]):
            if i == followup.shape[1] - 1 and hasattr(cache, "request_boundary"):
                cache.request_boundary()
            attention_mask = torch.cat([attention_mask, torch.ones_like(attention_mask[:, :1])], dim=1)
            out = model(
                input_ids=followup[:, i : i + 1],
                attention_mask=attention_mask,
                position_ids=next_pos,
                past_key_values=cache,
                use_cache=True,
            )
            next_pos = next_pos + 1
        logits = out.logits[:, -1]
        choose = (sampling or Sampling()).chooser(device)
        tokens, done = [], torch.zeros(batch, dtype=torch.bool, device=device)
        for _ in range(max_new_tokens):
            tok = choose(logits)
            if tokens:
                tok = torch.where(done, tokens[-1], tok)
            tokens.append(tok)
            if on_token is not None:
                on_token(tok)
            if stop is not None:
                done |= stop.update(tok, finished=done)
            done |= torch.isin(tok, stops)
            if bool(done.all()):
                break
            if graph is not None:  # the LSA cache hands attention its own mask: padding lives in the resident set
                logits = graph(tok[:, None], next_pos)
            else:
                attention_mask = torch.cat([attention_mask, torch.ones_like(attention_mask[:, :1])], dim=1)
                out = model(
                    input_ids=tok[:, None],
                    attention_mask=attention_mask,
                    position_ids=next_pos,
                    past_key_values=cache,
                    use_cache=True,
                )
                logits = out.logits[:, -1]
            next_pos = next_pos + 1
            if isinstance(cache, DynamicCache):
                stats.kv_bytes_device = max(stats.kv_bytes_device, dynamic_cache_bytes(cache))
        _sync(device)
        stats.decode_seconds = time.perf_counter() - t0
        if allocated_before is not None:
            stats.allocator_decode_peak_bytes = torch.cuda.max_memory_allocated(device) - allocated_before
        stats.new_tokens = len(tokens)
        stats.replayed_steps = graph.replays if graph is not None else 0
        _fill_cache_stats(stats, cache, context + followup.shape[1] + len(tokens))
    finally:
        if isinstance(cache, LSACache):
            cache.close()
    return torch.stack(tokens, dim=1), stats


def _followup(followup_ids: torch.Tensor | None, input_ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The follow-up turn on the prompt's device (an empty ``[B, 0]`` without one), checked against the prompt."""
    if followup_ids is None:
        return input_ids[:, :0]
    followup_ids = followup_ids.to(input_ids.device)
    if followup_ids.dim() != 2 or followup_ids.shape[0] != input_ids.shape[0]:
        raise ValueError(f"followup_ids must be [batch={input_ids.shape[0]}, F], got {tuple(followup_ids.shape)}")
    if followup_ids.shape[1] and not bool(mask.bool().all()):
        raise ValueError("followup_ids needs unpadded prompts (a turn after left-padded prompts would misalign)")
    return followup_ids


def _fill_cache_stats(stats: GenerationStats, cache, final_len: int) -> None:
    if isinstance(cache, LSACache):
        cache.sync_stats()
        stats.kv_bytes_device = cache.stats.peak_device_bytes or cache.device_kv_bytes()
        stats.kv_bytes_full = cache.full_kv_bytes(final_len)
        copy_cycle_stats(stats, cache)
    else:
        stats.kv_bytes_device = max(stats.kv_bytes_device, dynamic_cache_bytes(cache))
        stats.kv_bytes_full = stats.kv_bytes_device


def copy_cycle_stats(stats: GenerationStats, cache: LSACycle) -> None:
    """Copy an LSA cache's boundary counters, host mirror bytes and page slots into ``stats``."""
    cs = cache.stats
    stats.kv_bytes_host = cache.host_kv_bytes()
    stats.boundaries = cs.boundaries
    stats.pages_recalled = list(cs.pages_recalled)
    stats.select_seconds = cs.select_seconds
    stats.recall_seconds = cs.recall_seconds
    stats.page_slots = cache.store.layout.num_page_slots
    stats.above_threshold = list(cs.above_threshold)


def dynamic_cache_bytes(cache) -> int:
    """Device bytes of a ``transformers`` dynamic cache: the storage behind every layer's keys and values."""
    return storage_bytes(t for layer in cache.layers for t in (layer.keys, layer.values))


def _as_list(ids: int | list[int] | None) -> list[int]:
    if ids is None:
        return []
    return [ids] if isinstance(ids, int) else list(ids)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def generate(
    model: nn.Module,
    tokenizer,
    prompt: str | list[str],
    *,
    method: str = "lsa",
    lsa: LSAConfig | None = None,
    indexer: MemoryIndexer | str | None = "auto",
    max_new_tokens: int = 64,
    chat: bool = True,
    cuda_graph: bool | None = None,
    sampling: Sampling | None = None,
    stop: str | list[str] | None = None,
    on_token: Callable[[torch.Tensor], None] | None = None,
) -> GenerationResult:
    """Answer one prompt or a batch of prompts with LSA (or full attention for comparison).

    Args:
        model: causal LM from :func:`flashmemory.load_model` or ``transformers``.
        tokenizer: its tokenizer.
        prompt: one prompt or a list (decoded together, each with its own resident set).
        method: ``"lsa"`` or ``"full"``. Default: "lsa".
        lsa: LSA settings. Default: ``LSAConfig()``.
        indexer: ``"auto"`` (the shipped trained indexer of this backbone, else zero-shot), ``"zero-shot"``,
            a checkpoint folder, or a :class:`MemoryIndexer`. Default: "auto".
        max_new_tokens: most tokens to generate. Default: 64.
        chat: wrap prompts in the tokenizer's chat template when it has one. Default: True.
        cuda_graph: replay LSA's decode steps from a captured CUDA graph (see :func:`generate_ids`): None whenever
            the model and device allow, True requires it, False decodes eagerly. Default: None.
        sampling: temperature, top-p, top-k and seed (:class:`~flashmemory.runtime.sampling.Sampling`).
            Default: greedy.
        stop: a string or strings that end an answer; the text ends before the first one reached. Default: None.
        on_token: called with each step's tokens as they are chosen, for streaming
            (:class:`~flashmemory.runtime.sampling.TextStream` turns them into text). # [B]

    Returns:
        Texts, token ids and :class:`GenerationStats`.
    """
    enc = encode_prompts(tokenizer, prompt_list(prompt), chat=chat)
    return generate_encoded(
        model,
        tokenizer,
        enc["input_ids"],
        enc["attention_mask"],
        method=method,
        lsa=lsa,
        indexer=indexer,
        max_new_tokens=max_new_tokens,
        cuda_graph=cuda_graph,
        sampling=sampling,
        stop=stop,
        on_token=on_token,
    )


def generate_encoded(
    model: nn.Module,
    tokenizer,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    *,
    method: str = "lsa",
    lsa: LSAConfig | None = None,
    indexer: MemoryIndexer | str | None = "auto",
    max_new_tokens: int = 64,
    cuda_graph: bool | None = None,
    sampling: Sampling | None = None,
    stop: str | list[str] | None = None,
    on_token: Callable[[torch.Tensor], None] | None = None,
) -> GenerationResult:
    """:func:`generate` for prompts already tokenised (by :func:`encode_prompts`, left-padded): a caller that
    tokenised a long prompt to check its length need not tokenise it again. # input_ids, attention_mask: [B, T]"""
    eos = tokenizer.eos_token_id
    if method == "lsa":
        indexer = resolve_indexer(model, indexer)
    stop_text = StopText.same_for_all(tokenizer, stop, input_ids.shape[0])
    ids, stats = generate_ids(
        model,
        input_ids,
        attention_mask,
        method=method,
        lsa=lsa,
        indexer=indexer,
        max_new_tokens=max_new_tokens,
        eos_token_id=eos,
        cuda_graph=cuda_graph,
        sampling=sampling,
        stop=stop_text,
        on_token=on_token,
    )
    return decode_result(tokenizer, ids, stats, stop_text)


def decode_result(
    tokenizer, ids: torch.Tensor, stats: GenerationStats, stop: StopText | None = None
) -> GenerationResult:
    """Texts and token ids of generated ``ids [B, N]``, each row cut before its first EOS, or at its stop string
    (the tokens through the one that completed it, the text before it)."""
    stops = _as_list(tokenizer.eos_token_id)
    token_ids = [_until_eos(row.tolist(), stops) for row in ids.cpu()]
    texts = [tokenizer.decode(t, skip_special_tokens=True) for t in token_ids]
    if stop is not None:
        for b in range(len(token_ids)):
            token_ids[b], texts[b], _ = stop.cut(b, token_ids[b], texts[b])
    return GenerationResult(texts=texts, token_ids=token_ids, stats=stats)


def _until_eos(ids: list[int], stops: list[int]) -> list[int]:
    for i, t in enumerate(ids):
        if t in stops:
            return ids[:i]
    return ids
