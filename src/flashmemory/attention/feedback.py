"""Attention feedback counted while an :class:`~flashmemory.attention.cache.LSACache` runs.

At the end of the prefill the prompt's last ``window`` tokens attend to every chunk; during decoding each step
attends to the resident chunks only. For each forward, every LSA layer's top-p chunk set is taken from the
attention the layer really computes (the query re-projected from the layer's input, against the keys the layer
attends to) and the chunks enough layers agree on are counted. The boundary then hands the counts to the
indexer's feedback head (:mod:`flashmemory.indexer.feedback`), the same way training replayed them from dumps.

It costs one extra ``q @ K`` per layer and step over the resident keys (and the window's rows over the prompt at
prefill), computed in float32 on the device.
"""

from __future__ import annotations

from collections import deque

import torch
from torch import nn

from ..indexer.feedback import FeedbackSpec, chunk_distance, chunk_mass, feedback_features, fit_chunks, top_p_sets
from ..models.adapter import attention_module, backbone_spec, rotated_queries

ROW_BLOCK = 16  # prompt-window rows per block at prefill: [B, H, rows, T] float32 scores exist together


class AttentionFeedback:
    """Per-request counts of the layers' attention consensus per chunk.

    Args:
        model: the backbone (its attention modules give the query projections).
        layers: the LSA layers, whose agreement is counted.
        spec: the indexer's feedback settings.
        chunk_size: tokens per chunk.
    """

    def __init__(self, model: nn.Module, layers: list[int], spec: FeedbackSpec, chunk_size: int) -> None:
        self.spec = spec
        self.chunk_size = chunk_size
        self.layers = list(layers)
        self.last_layer = self.layers[-1]
        self.model_spec = backbone_spec(model)
        self.modules = {layer: attention_module(model, layer) for layer in self.layers}
        self.queries: dict[int, torch.Tensor] = {}
        self.layer_hits: torch.Tensor | None = None  # this forward's top-p votes per chunk (and row)
        self.prompt_hits: torch.Tensor | None = None  # [B, N]
        self.prompt_rows = 0
        self.steps: deque[tuple[torch.Tensor, torch.Tensor]] = deque(maxlen=spec.window)

    def capture_query(self, layer: int, hidden: torch.Tensor, position_embeddings, rows: int) -> None:
        """Post-rotary queries of the newest ``rows`` tokens entering ``layer``'s attention. # [B, H, rows, D]"""
        ms = self.model_spec
        cos, sin = (r[:, -rows:, None, :] for r in position_embeddings)  # [B, rows, 1, D]
        q = rotated_queries(self.modules[layer], ms.head_dim, hidden[:, -rows:], cos, sin)
        self.queries[layer] = q.transpose(1, 2).float()

    def _scores(self, layer: int, q: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        """Scaled ``q . k`` with the key heads shared by their query groups. # [B, H, rows, T]"""
        ms = self.model_spec
        k = keys.float().repeat_interleave(ms.num_heads // ms.num_kv_heads, dim=1)
        return torch.matmul(q, k.transpose(-1, -2)) * float(self.modules[layer].scaling)

    def observe_prefill(self, layer: int, keys: torch.Tensor, pad_len: torch.Tensor) -> None:
        """Vote with the prompt window's attention over the whole prompt at ``layer``.

        Args:
            layer: an LSA layer.
            keys: its post-rotary keys of the prompt. # [B, Hkv, T, D]
            pad_len: left padding per sequence. # [B]
        """
        q = self.queries.pop(layer, None)
        if q is None:
            return
        c, t, rows = self.chunk_size, keys.shape[2], q.shape[2]
        pos = torch.arange(t, device=keys.device)
        pad = pad_len.to(keys.device)[:, None, None, None]
        votes = []
        for lo in range(0, rows, ROW_BLOCK):
            block = q[:, :, lo : lo + ROW_BLOCK]
            own = t - rows + lo + torch.arange(block.shape[2], device=keys.device)  # each row's position
            hidden_keys = (pos[None, :] > own[:, None])[None, None] | (pos[None, None, None, :] < pad)
            probs = torch.softmax(self._scores(layer, block, keys).masked_fill(hidden_keys, float("-inf")), -1)
            votes.append(top_p_sets(chunk_mass(probs.transpose(1, 2), c), self.spec.top_p))  # [B, rows, N]
        layer_votes = torch.cat(votes, 1).to(torch.int16)
        self.layer_hits = layer_votes if self.layer_hits is None else self.layer_hits + layer_votes
        if layer == self.last_layer:
            agreed = self.layer_hits >= self.spec.min_layers  # [B, rows, N]
            self.prompt_hits = agreed.sum(1)
            self.prompt_rows = rows
            self.layer_hits = None

    def observe_decode(self, layer: int, keys: torch.Tensor, slot_pos: torch.Tensor, seq_len: int) -> None:
        """Vote with this step's attention over the resident slots at ``layer``.

        Args:
            layer: an LSA layer.
            keys: its reserve keys. # [B, Hkv, S, D]
            slot_pos: absolute position per slot, -1 for slots attention skips. # [B, S]
            seq_len: tokens so far, this step's included (the newest chunk counts once complete).
        """
        q = self.queries.pop(layer, None)
        if q is None:
            return
        c = self.chunk_size
        n = seq_len // c
        valid = slot_pos >= 0
        probs = torch.softmax(self._scores(layer, q, keys)[:, :, 0].masked_fill(~valid[:, None], float("-inf")), -1)
        chunk = torch.where(valid, slot_pos.div(c, rounding_mode="floor"), n).clamp(max=n)  # n: not a chunk
        mass = torch.zeros(probs.shape[0], n + 1, device=probs.device).scatter_add_(1, chunk, probs.mean(1))
        votes = top_p_sets(mass[:, :n], self.spec.top_p).to(torch.int16)
        self.layer_hits = votes if self.layer_hits is None else self.layer_hits + votes
        if layer == self.last_layer:
            seen = torch.zeros(probs.shape[0], n + 1, dtype=torch.bool, device=probs.device)
            seen.scatter_(1, chunk, valid)
            agreed = (self.layer_hits >= self.spec.min_layers) & seen[:, :n]
            self.steps.append((agreed, seen[:, :n]))
            self.layer_hits = None

    def features(self, indexer_logit: torch.Tensor, newest: int) -> torch.Tensor:
        """The head's input at a boundary. # [B, N, F]

        Args:
            indexer_logit: the tower's logit per chunk. # [B, N]
            newest: index of the newest token processed.
        """
        b, n = indexer_logit.shape
        device = indexer_logit.device
        counts = torch.zeros(b, n, dtype=torch.long, device=device)
        prompt = counts if self.prompt_hits is None else fit_chunks(self.prompt_hits.long(), n)
        hits, resident = counts, counts
        for agreed, seen in self.steps:  # the chunk count grows while decoding
            hits = hits + fit_chunks(agreed.long(), n)
            resident = resident + fit_chunks(seen.long(), n)
        distance = chunk_distance(n, torch.tensor(newest, device=device), self.chunk_size).expand(b, -1)
        return feedback_features(
            indexer_logit, prompt, self.prompt_rows, hits, resident, len(self.steps), distance, self.spec.window
        )
