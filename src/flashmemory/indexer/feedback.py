"""Attention feedback: what the backbone's own attention said about each chunk, as an input of the indexer.

The golden label is a consensus of all layers, and it persists: the chunks all layers agreed on in the last cycle
are mostly the ones they agree on in the next. The query tower reads a few layers' hidden states and cannot see
that consensus; the runtime can. It counts, per chunk, how often the layers agreed on it:

- at the end of the prefill, over the prompt's last ``window`` tokens, with every chunk visible;
- during decoding, over the last ``window`` steps, with only the resident chunks visible (attention over a subset
  is the full softmax renormalised, so a resident chunk's share is exact; a chunk not resident is not seen).

A small head turns those counts, the query tower's logit and the chunk's distance into the boundary's logit. The
same code builds the counts in the runtime and, from dumps, in training and evaluation.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn

FEATURES = (
    "indexer logit (within +-12) / 4",
    "prompt-window consensus rate",
    "prompt-window consensus seen",
    "decode consensus rate",
    "decode consensus seen",
    "resident rate over the decode window",
    "decode window fill",
    "log1p(chunk distance) / 8",
)


def chunk_mass(probs: torch.Tensor, chunk_size: int) -> torch.Tensor:
    """Attention mass per chunk, summed over the chunk's tokens and averaged over heads.

    Args:
        probs: attention probabilities over ``T`` keys, per head. # [..., H, T]
        chunk_size: tokens per chunk; a trailing partial chunk is dropped.

    Returns:
        Mass per complete chunk. # [..., N]
    """
    n = probs.shape[-1] // chunk_size
    return probs[..., : n * chunk_size].float().unflatten(-1, (n, chunk_size)).sum(-1).mean(-2)


def fit_chunks(x: torch.Tensor, n: int) -> torch.Tensor:
    """``x`` cut or zero-padded to ``n`` chunks on its last axis (the chunk count grows while decoding)."""
    if x.shape[-1] == n:
        return x
    out = x.new_zeros(*x.shape[:-1], n)
    m = min(n, x.shape[-1])
    out[..., :m] = x[..., :m]
    return out


def top_p_sets(mass: torch.Tensor, top_p: float) -> torch.Tensor:
    """The smallest set of chunks whose mass reaches ``top_p`` of each row's total (ties broken by index).

    Args:
        mass: chunk masses, one row per query (and layer). # [..., N]
        top_p: fraction of the total to cover, in (0, 1].

    Returns:
        Boolean membership. # [..., N]
    """
    if mass.shape[-1] == 0:
        return torch.zeros(mass.shape, dtype=torch.bool, device=mass.device)
    order = torch.argsort(mass, dim=-1, descending=True, stable=True)
    ranked = mass.gather(-1, order)
    before = torch.cumsum(ranked, -1) - ranked  # mass strictly above each chunk in the order
    keep_ranked = before < top_p * ranked.sum(-1, keepdim=True)
    return torch.zeros_like(keep_ranked).scatter(-1, order, keep_ranked)


@dataclass(slots=True)
class FeedbackSpec:
    """How the feedback counts are made and read (stored in the indexer checkpoint).

    Args:
        window: prompt tokens at the end of the prefill, and decode steps before a boundary, that are counted.
        top_p: each layer's top-p chunk set (the dumps' label setting).
        min_layers: layers that must agree (the dumps' label setting).
        hidden: width of the head's hidden layer.
        kept: fraction of the candidate chunks resident during the decode steps the head was trained on.
        tower_slots: share of the page slots the runtime gives to the tower's best chunks (see
            :attr:`flashmemory.config.LSAConfig.tower_slots`, which overrides it when set).
    """

    window: int = 64
    top_p: float = 0.6
    min_layers: int = 3
    hidden: int = 32
    kept: float = 0.15
    tower_slots: float = 0.5

    def to_dict(self) -> dict:
        return asdict(self)


class FeedbackHead(nn.Module):
    """Per chunk: features -> logit of "needed in the coming cycle"."""

    def __init__(self, spec: FeedbackSpec) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(len(FEATURES), spec.hidden), nn.SiLU(), nn.Linear(spec.hidden, 1))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """Logits. # [..., N] from [..., N, F]"""
        return self.net(features).squeeze(-1)


def feedback_features(
    indexer_logit: torch.Tensor,
    prompt_hits: torch.Tensor,
    prompt_rows: int,
    decode_hits: torch.Tensor,
    resident_steps: torch.Tensor,
    decode_steps: int,
    distance: torch.Tensor,
    window: int,
) -> torch.Tensor:
    """The head's input per chunk (see :data:`FEATURES`).

    Args:
        indexer_logit: the query tower's logit (combined over target layers). # [..., N]
        prompt_hits: prompt-window tokens whose layers agreed on the chunk. # [..., N]
        prompt_rows: prompt-window tokens counted.
        decode_hits: decode steps of the window whose layers agreed on the chunk while it was resident. # [..., N]
        resident_steps: decode steps of the window the chunk was resident in. # [..., N]
        decode_steps: decode steps in the window (0 at the first boundary).
        distance: chunks between this one and the newest token's chunk. # [..., N]
        window: the spec's window.

    Returns:
        Features. # [..., N, F]
    """
    rows = max(prompt_rows, 1)
    steps = max(decode_steps, 1)
    prompt_hits, decode_hits = prompt_hits.float(), decode_hits.float()
    cols = [
        indexer_logit.float().clamp(-12.0, 12.0) / 4.0,
        prompt_hits / rows,
        (prompt_hits > 0).float(),
        decode_hits / steps,
        (decode_hits > 0).float(),
        resident_steps.float() / steps,
        torch.full_like(prompt_hits, min(decode_steps, window) / window),
        torch.log1p(distance.float().clamp(min=0)) / 8.0,
    ]
    return torch.stack(cols, -1)


def chunk_distance(num_chunks: int, newest: torch.Tensor | int, chunk_size: int) -> torch.Tensor:
    """Chunks between each chunk and the one holding token index ``newest`` (0 for that chunk). # [..., N]"""
    newest = torch.as_tensor(newest)
    return newest[..., None].div(chunk_size, rounding_mode="floor") - torch.arange(num_chunks, device=newest.device)


def consensus(layer_mass: torch.Tensor, spec: FeedbackSpec, visible: torch.Tensor | None = None) -> torch.Tensor:
    """Chunks that at least ``min_layers`` layers put in their top-p set, seeing only the ``visible`` chunks.

    Args:
        layer_mass: per-layer attention mass per chunk (any scale: top-p is relative). # [..., L, N]
        spec: top-p and agreement settings.
        visible: chunks the attention could reach (None: all). # [..., N]

    Returns:
        Boolean consensus. # [..., N]
    """
    if visible is not None:
        layer_mass = layer_mass * visible.unsqueeze(-2).to(layer_mass.dtype)
    sets = top_p_sets(layer_mass.float(), spec.top_p)
    if visible is not None:
        sets &= visible.unsqueeze(-2)
    return sets.sum(-2) >= spec.min_layers


def logit_of(probs: torch.Tensor) -> torch.Tensor:
    """Logit of the indexer's probabilities, finite at 0 and 1."""
    eps = 1e-6
    return torch.log(probs.clamp(eps, 1 - eps)) - torch.log1p(-probs.clamp(eps, 1 - eps))


__all__ = [
    "FEATURES",
    "FeedbackHead",
    "FeedbackSpec",
    "chunk_distance",
    "chunk_mass",
    "consensus",
    "feedback_features",
    "fit_chunks",
    "logit_of",
    "top_p_sets",
]
