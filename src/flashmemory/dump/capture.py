"""Run a backbone with full attention and record what the indexer needs, step by step."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from transformers.cache_utils import DynamicCache

from ..indexer.chunk_keys import chunk_means
from ..models.adapter import attention_module, backbone_spec, rotated_queries
from .labels import chunk_mass, chunk_peak, decidable_chunks, golden_chunks, stack_peaks, to_csr, top_p_mask

# Per-layer masses are cut at top-p again when feedback is replayed: near-equal masses would flip at the cut after
# fp16 rounding, so they keep float32.
FIELD_DTYPES = {"layer_mass": torch.float32}


@dataclass(slots=True)
class LabelConfig:
    """How golden chunks are derived from attention.

    Args:
        chunk_size: tokens per chunk. Default: 16.
        top_p: mass each layer's top-p set covers. Default: 0.6.
        min_layers: layers that must agree for a chunk to be golden. Default: 3.
        sink: leading tokens whose chunks are left out of the top-p cut (they are always resident). Default: 0.
        recent: newest tokens whose chunks are left out of the top-p cut, likewise. Default: 0.

    Leaving the always-resident chunks out sounds right but measured badly: on SmolLM2 the attention mass that
    remains is diffuse, so the top-p set of the rest grows until the union over a cycle covers about half of the
    history (sink=16, recent=64 gave 126-153 golden chunks of 243-267 per prompt), and the labels stop telling
    chunks apart. With the defaults, sink and tail stay in the cut and only the heaviest far chunks make it.
    """

    chunk_size: int = 16
    top_p: float = 0.6
    min_layers: int = 3
    sink: int = 0
    recent: int = 0

    def __post_init__(self) -> None:
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.min_layers < 1 or self.chunk_size < 1:
            raise ValueError("min_layers and chunk_size must be >= 1")
        if self.sink < 0 or self.recent < 0:
            raise ValueError("sink and recent must be >= 0")

    def decidable(self, num_chunks: int, seq_len: int) -> torch.Tensor:
        """Chunks the indexer decides on when the newest token is at ``seq_len - 1``. # [N]"""
        return decidable_chunks(num_chunks, seq_len, self.chunk_size, self.sink, self.recent)


def record_steps(
    model: nn.Module,
    input_ids: torch.Tensor,
    cache,
    recorder,
    observe: Callable[[int], tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor] | None]],
    *,
    max_new_tokens: int,
    eos_token_id: list[int],
    min_layers: int,
) -> dict[str, torch.Tensor]:
    """Prefill ``input_ids`` (batch 1) into ``cache``, decode greedily, and record every step's golden chunks.

    Step 0 is the prompt's forward, step ``s > 0`` the ``s``-th decode forward. After each forward
    ``observe(seq_len)`` (``seq_len``: tokens the model has seen) returns each layer's selection of chunks
    ``[num_layers, N]``, the target layers' recorded hidden states, newest last, ``[W, L, ...]``, and the peak
    single-head masses per chunk, ``{field: [N]}`` (None where the backbone has no per-head attention to report).
    The recorder's hooks are removed at the end, whatever happens.

    Returns:
        The dump fields every backbone shares: ``hidden [S, L, ...]``, ``positions [S]``, ``tokens``,
        ``prefix_hidden [P, L, ...]`` / ``prefix_positions [P]``, the golden CSR (``indptr``, ``indices``,
        ``hits``) and, when observed, each peak field ``[S, N]``.
    """
    hidden, golden, hits = [], [], []
    peaks: dict[str, list[torch.Tensor]] = {}
    tokens = input_ids[0].tolist()
    try:
        out = model(input_ids=input_ids, past_key_values=cache, use_cache=True)
        for step in range(max_new_tokens + 1):
            masks, window, step_peaks = observe(len(tokens))
            for name, value in (step_peaks or {}).items():
                peaks.setdefault(name, []).append(value)
            ids, count = golden_chunks(masks, min_layers)
            golden.append(ids.cpu())
            hits.append(count.cpu())
            if step == 0:
                prefix = window[:-1]  # [P, L, ...]: the prompt tokens that share step 0's lookahead window
            hidden.append(window[-1].to(torch.float16).cpu())
            if step == max_new_tokens:
                break
            tok = int(out.logits[0, -1].argmax())
            if tok in eos_token_id:
                break
            tokens.append(tok)
            out = model(input_ids=torch.tensor([[tok]], device=input_ids.device), past_key_values=cache, use_cache=True)
    finally:
        recorder.remove()
    first = input_ids.shape[1] - 1  # the position of step 0
    extra = {name: stack_peaks(values, FIELD_DTYPES.get(name, torch.float16)) for name, values in peaks.items()}
    return {
        **extra,
        "hidden": torch.stack(hidden),
        "positions": torch.arange(first, first + len(hidden), dtype=torch.long),
        "tokens": torch.tensor(tokens, dtype=torch.long),
        "prefix_hidden": prefix.to(torch.float16).cpu(),
        "prefix_positions": torch.arange(first - prefix.shape[0], first),
        **to_csr(golden, hits),
    }


class AttentionRecorder:
    """Pre-hooks on every full-attention layer that keep the newest token's hidden state and rotary angles."""

    def __init__(self, model: nn.Module, keep: int = 1) -> None:
        self.model = model
        self.keep = max(1, keep)
        self.layers = backbone_spec(model).full_layers
        self.hidden: dict[int, torch.Tensor] = {}
        self.rope: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.handles = [
            attention_module(model, layer).register_forward_pre_hook(self._hook(layer), with_kwargs=True)
            for layer in self.layers
        ]

    def _hook(self, layer: int):
        def hook(module, args, kwargs):
            hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
            # The prompt's newest tokens form the runtime's first lookahead window, so prefill keeps a few of them;
            # a clone, because a view would pin all of the prompt's hidden states.
            self.hidden[layer] = hidden[:, -self.keep :].detach().clone()
            cos, sin = kwargs["position_embeddings"]
            self.rope[layer] = (cos[:, -self.keep :].detach().clone(), sin[:, -self.keep :].detach().clone())

        return hook

    def remove(self) -> None:
        for h in self.handles:
            h.remove()

    def attention_probs(self, layer: int, keys: torch.Tensor) -> torch.Tensor:
        """Attention probabilities of the newest token at ``layer`` over all cached keys (batch 1). # [H, T]"""
        return self.window_probs(layer, keys, 1)[0]

    def window_probs(self, layer: int, keys: torch.Tensor, rows: int) -> torch.Tensor:
        """Causal attention probabilities of the newest ``rows`` kept tokens at ``layer`` over the cached keys
        (batch 1); the newest token sees every key, each older one the keys up to its own. # [rows, H, T]"""
        attn = attention_module(self.model, layer)
        spec = backbone_spec(self.model)
        h = self.hidden[layer][0, -rows:]
        cos, sin = (r[0, -rows:, None] for r in self.rope[layer])  # [rows, 1, D]
        q = rotated_queries(attn, spec.head_dim, h, cos, sin)  # [rows, H, D]
        k = keys[0].repeat_interleave(spec.num_heads // spec.num_kv_heads, 0)  # [H, T, D]
        scores = torch.einsum("rhd,htd->rht", q.float(), k.float()) * float(attn.scaling)
        t = k.shape[1]
        last = torch.arange(t - h.shape[0], t, device=scores.device)  # each row's own position
        future = torch.arange(t, device=scores.device)[None, :] > last[:, None]  # [rows, T]
        return torch.softmax(scores.masked_fill(future[:, None], float("-inf")), dim=-1)


def _decidable_mass(
    recorder: AttentionRecorder, layer: int, keys: torch.Tensor, labels: LabelConfig, seq_len: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Head-mean and peak-head chunk masses of the newest token at ``layer``, zero for always-resident chunks
    where the label settings leave those out. # [N], [N]"""
    probs = recorder.attention_probs(layer, keys)
    mass, peak = chunk_mass(probs, labels.chunk_size), chunk_peak(probs, labels.chunk_size)
    if labels.sink == 0 and labels.recent == 0:  # the default: every complete chunk takes part
        return mass, peak
    keep = labels.decidable(mass.shape[0], seq_len).to(mass.device)
    return mass * keep, peak * keep


def _prefix_golden(
    recorder: AttentionRecorder, cache, labels: LabelConfig, seq_len: int, rows: int, min_layers: int
) -> dict[str, torch.Tensor]:
    """Golden chunks of the ``rows`` prompt tokens before the last one, each over the keys up to itself, as CSR
    ``prefix_indptr``/``prefix_indices``/``prefix_hits`` (oldest first)."""
    if rows <= 0:
        return _prefixed(to_csr([], []))
    masks = []  # per layer [rows, N]
    for layer in recorder.layers:
        probs = recorder.window_probs(layer, cache.layers[layer].keys, rows + 1)[:-1]  # [rows, H, T]
        per_row = []
        for r in range(rows):
            mass = chunk_mass(probs[r], labels.chunk_size)
            if labels.sink or labels.recent:
                mass = mass * labels.decidable(mass.shape[0], seq_len - rows + r).to(mass.device)
            per_row.append(top_p_mask(mass, labels.top_p))
        masks.append(torch.stack(per_row))
    layer_masks = torch.stack(masks, 1)  # [rows, L, N]
    ids, hits = zip(*(golden_chunks(m, min_layers) for m in layer_masks), strict=True)
    return _prefixed(to_csr(list(ids), list(hits)))


def _prefixed(csr: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {f"prefix_{k}": v for k, v in csr.items()}


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
    token_keys: bool = False,
    feedback_window: int = 64,
) -> dict[str, torch.Tensor]:
    """Prefill ``input_ids`` (batch 1), decode greedily, and record one prompt's dump.

    Step 0 is the last prompt token; step ``s > 0`` is the ``s``-th decode forward.

    Returns:
        ``hidden [S, L, hidden]`` (target layers), ``positions [S]``, golden CSR (``indptr``, ``indices``,
        ``hits``), ``peak [S, N]`` (largest single-head mass per chunk over all layers), ``peak_target [S, N]``
        (the same over the target layers only: what the heads of the layers the indexer scores with read),
        ``chunk_keys``/``chunk_kmin``/``chunk_kmax`` ``[L, Hkv, N, D]`` of the final sequence,
        ``layer_mass [S, num_layers, N]`` (each layer's head-mean mass per chunk: what a scorer that sees only some
        chunks would have found, since attention over a subset is the same softmax renormalised),
        ``tokens`` (prompt + generated ids), and ``prefix_hidden [P, L, hidden]`` / ``prefix_positions [P]``: the
        ``query_window - 1`` prompt tokens before step 0, which join it in the first lookahead window. With
        ``token_keys``, also ``token_keys [L, Hkv, N * chunk, D]``: every key of the complete chunks, so that
        scorers can rate a chunk by its best token, as the runtime can at a boundary. With ``feedback_window``
        ``W > 1``, also the golden CSR of the ``W - 1`` prompt tokens before step 0 (``prefix_indptr``,
        ``prefix_indices``, ``prefix_hits``, oldest first): the attention the runtime sees at the end of the
        prefill, which the indexer's feedback input counts.
    """
    recorder = AttentionRecorder(model, keep=max(query_window, feedback_window))
    cache = DynamicCache(config=model.config)
    prefix_labels: dict[str, torch.Tensor] = {}

    def observe(seq_len: int) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        if feedback_window > 1 and not prefix_labels:  # the first call: right after the prefill
            rows = min(feedback_window, seq_len) - 1
            prefix_labels.update(
                _prefix_golden(recorder, cache, labels, seq_len, rows, min(labels.min_layers, len(recorder.layers)))
            )
        masks, masses, peak, target_peak = [], [], None, None
        for layer in recorder.layers:
            mass, layer_peak = _decidable_mass(recorder, layer, cache.layers[layer].keys, labels, seq_len)
            masks.append(top_p_mask(mass, labels.top_p))
            masses.append(mass)
            peak = layer_peak if peak is None else torch.maximum(peak, layer_peak)
            if layer in targets:
                target_peak = layer_peak if target_peak is None else torch.maximum(target_peak, layer_peak)
        window = torch.stack([recorder.hidden[layer][0, -query_window:] for layer in targets], 1)
        fields = {"peak": peak, "layer_mass": torch.stack(masses)}
        if target_peak is not None:
            fields["peak_target"] = target_peak
        return torch.stack(masks), window, fields

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
    record.update(prefix_labels)
    zero = torch.zeros(1, dtype=torch.long, device=input_ids.device)
    means, kmin, kmax, tokens = [], [], [], []
    c = labels.chunk_size
    for layer in targets:
        keys = cache.layers[layer].keys  # [1, Hkv, T, D]
        n = keys.shape[2] // c
        blocks = keys[:, :, : n * c].unflatten(2, (n, c))
        means.append(chunk_means(keys, 0, c, zero)[0])
        kmin.append(blocks.amin(3)[0])
        kmax.append(blocks.amax(3)[0])
        if token_keys:
            tokens.append(keys[0, :, : n * c])
    record["chunk_keys"] = torch.stack(means).to(torch.float16).cpu()
    record["chunk_kmin"] = torch.stack(kmin).to(torch.float16).cpu()
    record["chunk_kmax"] = torch.stack(kmax).to(torch.float16).cpu()
    if token_keys:
        record["token_keys"] = torch.stack(tokens).to(torch.float16).cpu()
    return record
