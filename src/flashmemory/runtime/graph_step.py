"""Decode steps replayed from a CUDA graph: one capture of an indexer-free step, replayed until the model ends.

Between boundaries an LSA decode step does the same device work every time (the new token goes to the tail slot
the device counter names, attention reads the bounds from device tensors), so one captured step serves every
later one. Boundary steps (indexer, tail flush, recall) run eagerly; they update the state in place, so the graph
stays valid after them. Removing the launch gaps of an eager transformers forward is what lets a small batch
approach its bandwidth floor.
"""

from __future__ import annotations

import torch
from torch import nn

from ..attention.cache import LSALayer
from ..attention.fast_path import FastLSACache, lsa_cache_backend
from ..config import LSAConfig
from ..indexer.memory_indexer import MemoryIndexer
from ..models.adapter import backbone_spec


def check_graph_replay(
    model: nn.Module, method: str, lsa: LSAConfig | None, indexer: MemoryIndexer | None = None
) -> None:
    """Refuse graph replay from what the model and settings say, before any prefill is spent on them.

    :class:`GraphDecodeStep` checks the built cache itself; this is for callers that prefill before they build it
    (a :class:`~flashmemory.runtime.session.Session` prefills the context once, then a cache per question).
    """
    reason = graph_replay_refusal(model, method, lsa, indexer)
    if reason is not None:
        raise ValueError(reason)


def graph_replay_refusal(
    model: nn.Module, method: str, lsa: LSAConfig | None, indexer: MemoryIndexer | None = None
) -> str | None:
    """Why graph replay cannot run ``model`` with these settings (and ``indexer``, whose feedback head can send
    ``"auto"`` to the masked path), or None when it can."""
    device = next(model.parameters()).device
    if device.type != "cuda":
        return f"graph replay needs the model on a CUDA device; it is on {device}"
    if getattr(model.config, "model_type", None) == "deepseek_v4":
        return "graph replay runs on transformers caches; DeepSeek-V4 decodes eagerly"
    if method != "lsa" or (lsa is not None and lsa.attention_backend == "mask"):
        return "graph replay needs method 'lsa' on the fast path (attention_backend 'auto', 'triton' or 'torch')"
    if lsa_cache_backend(model, lsa, indexer) == "mask":
        return (
            "graph replay needs the fast path, which attention_backend 'auto' leaves here for the masked one (no "
            "Triton, an attention implementation other than sdpa or eager, or attention_feedback=True)"
        )
    if any(kind != "full_attention" for kind in backbone_spec(model).layer_types):
        return "graph replay needs every decoder layer to be a full-attention LSA layer"
    return None


def choose_graph_replay(
    model: nn.Module, lsa: LSAConfig | None, asked: bool | None, indexer: MemoryIndexer | None = None
) -> bool:
    """Whether LSA answers replay their decode steps: ``asked`` True requires it (refused with the reason when it
    cannot run), False never, None (every entry point's default) whenever it can: on a CUDA device every answer
    measured was faster whole with the same tokens, 1.3–5.4x on an 8B shape (``graph_replay_requests_h200/``) and
    2.5–8.2x with the real default model (``graph_replay_real_smollm2_h200/``)."""
    if asked is None:
        return graph_replay_refusal(model, "lsa", lsa, indexer) is None
    if asked:
        check_graph_replay(model, "lsa", lsa, indexer)
    return asked


class GraphDecodeStep:
    """Run decode steps of ``model`` with a :class:`FastLSACache`, replaying a CUDA graph between boundaries.

    Args:
        model: the causal LM (every decoder layer full attention: sliding-window caches reallocate per step).
        cache: an open fast-path cache after prefill.
    """

    def __init__(self, model: nn.Module, cache: FastLSACache) -> None:
        device = next(model.parameters()).device
        if device.type != "cuda":
            raise ValueError(f"graph replay needs the model on a CUDA device; it is on {device}")
        if not isinstance(cache, FastLSACache):
            raise ValueError(
                "graph replay needs method 'lsa' on the fast path (a FastLSACache: LSAConfig.attention_backend "
                "'auto', 'triton' or 'torch')"
            )
        if not all(isinstance(layer, LSALayer) for layer in cache.layers):
            raise ValueError("graph replay needs every decoder layer to be a full-attention LSA layer")
        self.model = model
        self.cache = cache
        self.graph: torch.cuda.CUDAGraph | None = None
        self.replays = 0

    @torch.no_grad()
    def __call__(self, input_ids: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        """One decode step.

        Args:
            input_ids: the newest token per sequence. # [B, 1]
            position_ids: its rotary position. # [B, 1]

        Returns:
            Next-token logits; a graph output that the next step overwrites (clone to keep). # [B, V]
        """
        if self.cache.next_step_is_boundary():
            out = self.model(input_ids=input_ids, position_ids=position_ids, past_key_values=self.cache, use_cache=True)
            return out.logits[:, -1]
        if self.graph is None:
            self._capture(input_ids, position_ids)
        else:
            self.static_ids.copy_(input_ids)
            self.static_pos.copy_(position_ids)
            self.cache.advance_replayed_step()
        self.graph.replay()
        self.replays += 1
        return self.logits

    def _capture(self, input_ids: torch.Tensor, position_ids: torch.Tensor) -> None:
        # Capturing records the step without running it; its host bookkeeping happens once, here, and the replay
        # that follows in __call__ does the device work of this same step.
        self.static_ids = input_ids.clone()
        self.static_pos = position_ids.clone()
        self.graph = torch.cuda.CUDAGraph()
        torch.cuda.synchronize()
        with torch.cuda.graph(self.graph):
            out = self.model(
                input_ids=self.static_ids, position_ids=self.static_pos, past_key_values=self.cache, use_cache=True
            )
        self.logits = out.logits[:, -1]
