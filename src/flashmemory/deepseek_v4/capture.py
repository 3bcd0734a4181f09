"""Dumps of DeepSeek-V4 for indexer training: labels from the native lightning indexer's own selections.

For every recorded token and CSA layer, the native indexer's top-k entries are softmaxed over their scores and
the smallest set holding ``top_p`` of that mass is the layer's selection; an entry is golden when at least
``min_layers`` CSA layers select it. Per token the tower input ``[q_residual | x]`` of every target layer is
recorded; per prompt the target layers' indexer keys (the frozen key tower). Records have the generic dump
layout, so the generic trainer reads them (see :mod:`flashmemory.dump.shards`).

This module is the DeepSeek-V4 capture backend of ``flashmemory dump`` (:mod:`flashmemory.dump.runner`).
"""

from __future__ import annotations

from dataclasses import replace

import torch
from torch import nn
from transformers.cache_utils import DynamicCache

from ..dump.capture import LabelConfig, record_steps
from ..dump.labels import top_p_mask
from .memory_indexer import DeepseekV4MemoryIndexer
from .spec import deepseek_v4_spec, native_indexer


def label_config(model: nn.Module, labels: LabelConfig) -> LabelConfig:
    """A V4 chunk is one CSA entry, whatever chunk size was asked for."""
    return replace(labels, chunk_size=deepseek_v4_spec(model).csa_rate)


def default_target_layers(model: nn.Module) -> tuple[int, ...]:
    return deepseek_v4_spec(model).default_target_layers()


def init_indexer(model: nn.Module, targets: tuple[int, ...], **kwargs) -> DeepseekV4MemoryIndexer:
    return DeepseekV4MemoryIndexer.from_model(model, targets, **kwargs)


def selection_mask(scores: torch.Tensor, topk: int, top_p: float) -> torch.Tensor:
    """One layer's selection for one query: top-p of the softmaxed native top-k scores.

    Args:
        scores: native index scores of every entry (``-inf`` for entries the query cannot see). # [N]
        topk: the indexer's ``index_topk``.
        top_p: mass of the softmaxed top-k the selection covers.

    Returns:
        Membership per entry. # [N]
    """
    keep = torch.zeros(scores.shape[0], dtype=torch.bool, device=scores.device)
    finite = int(torch.isfinite(scores).sum())
    if finite == 0:
        return keep
    top = scores.float().topk(min(topk, finite))
    keep[top.indices[top_p_mask(torch.softmax(top.values, 0), top_p)]] = True
    return keep


class SelectionRecorder:
    """Hooks that keep, for the newest token, every CSA layer's index scores and the target layers' tower input."""

    def __init__(self, model: nn.Module, targets: tuple[int, ...], keep: int = 1) -> None:
        spec = deepseek_v4_spec(model)
        self.keep = max(1, keep)
        self.layers = spec.csa_layers
        self.scores: dict[int, torch.Tensor] = {}
        self.hidden: dict[int, torch.Tensor] = {}
        self.handles = []
        for layer in self.layers:
            native = native_indexer(model, layer)
            self.handles.append(native.scorer.register_forward_hook(self._keep_scores(layer)))
            if layer in targets:
                self.handles.append(native.register_forward_pre_hook(self._keep_hidden(layer)))

    def _keep_scores(self, layer: int):
        def hook(module, args, scores):
            self.scores[layer] = scores[0, -1].detach().clone()

        return hook

    def _keep_hidden(self, layer: int):
        def hook(module, args):
            # The prompt's newest tokens form the first lookahead window, so prefill keeps a few of them.
            self.hidden[layer] = torch.cat([args[1][0, -self.keep :], args[0][0, -self.keep :]], -1).detach().clone()

        return hook

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


@torch.no_grad()
def capture_prompt(
    model: nn.Module,
    input_ids: torch.Tensor,
    *,
    targets: tuple[int, ...],
    labels: LabelConfig,
    max_new_tokens: int,
    eos_token_id: list[int],
    query_window: int = 16,
) -> dict[str, torch.Tensor]:
    """Prefill ``input_ids`` (batch 1), decode greedily with transformers' own cache, record one prompt's dump.

    Step 0 is the last prompt token; step ``s > 0`` the ``s``-th decode forward.

    Returns:
        ``hidden [S, L, q_lora_rank + hidden]``, ``positions [S]``, golden CSR (``indptr``, ``indices``,
        ``hits``), ``chunk_keys``/``chunk_kmin``/``chunk_kmax`` ``[L, 1, N, D_idx]`` (one key per entry, in the
        tower's channel order), ``tokens``, and ``prefix_hidden [P, L, ...]`` / ``prefix_positions [P]``: the
        ``query_window - 1`` prompt tokens before step 0, which join it in the first lookahead window.
    """
    spec = deepseek_v4_spec(model)
    recorder = SelectionRecorder(model, targets, keep=query_window)
    cache = DynamicCache(config=model.config)

    def observe(seq_len: int) -> tuple[torch.Tensor, torch.Tensor, None]:  # no peak fields
        masks = [selection_mask(recorder.scores[i], spec.index_topk, labels.top_p) for i in recorder.layers]
        # The native top-k scores are one score per entry, not per-head attention: no peak-head labels here.
        return torch.stack(masks), torch.stack([recorder.hidden[i] for i in targets], 1), None

    record = record_steps(
        model,
        input_ids,
        cache,
        recorder,
        observe,
        max_new_tokens=max_new_tokens,
        eos_token_id=eos_token_id,
        min_layers=min(labels.min_layers, len(recorder.layers)),
    )
    perm = DeepseekV4MemoryIndexer.permutation_for(spec)
    keys = torch.stack([cache.layers[i].compressed_kv["indexer"][0][:, perm] for i in targets])[:, None]
    keys = keys.to(torch.float16).cpu()  # [L, 1, N, D_idx]
    return {
        **record,
        "chunk_keys": keys,
        "chunk_kmin": keys.clone(),  # one key per entry: its bounds are the key itself
        "chunk_kmax": keys.clone(),
    }
