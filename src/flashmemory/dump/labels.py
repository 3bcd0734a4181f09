"""Golden chunks from attention: per layer the top-p chunks by attention mass, golden where enough layers agree."""

from __future__ import annotations

import torch

# one definition for the labels, the runtime's feedback counts and their replay: ``chunk_mass`` takes ``[..., H, T]``
# probabilities, ``top_p_mask`` any number of leading axes
from ..indexer.feedback import chunk_mass
from ..indexer.feedback import top_p_sets as top_p_mask


def chunk_peak(probs: torch.Tensor, chunk_size: int) -> torch.Tensor:
    """Largest attention mass any single head puts on each chunk.

    Averaging over heads hides retrieval: in small GQA models a fact is read by one or two heads that put most of
    their attention on its chunk while the others look at recent tokens, so its head-mean mass stays small.

    Args:
        probs: attention probabilities of one query over ``T`` keys. # [H, T]
        chunk_size: tokens per chunk; a trailing partial chunk is dropped.

    Returns:
        Peak head mass per complete chunk. # [N]
    """
    n = probs.shape[-1] // chunk_size
    return probs[:, : n * chunk_size].float().view(probs.shape[0], n, chunk_size).sum(-1).amax(0)


def decidable_chunks(
    num_chunks: int, seq_len: int | torch.Tensor, chunk_size: int, sink: int, recent: int
) -> torch.Tensor:
    """Chunks the indexer decides on once ``seq_len`` tokens exist: clear of the first ``sink`` tokens and older
    than the newest ``recent`` ones (those are always resident).

    Args:
        num_chunks: chunks of the sequence.
        seq_len: tokens so far, an int or a tensor of several lengths. # [] or [S]
        chunk_size: tokens per chunk.
        sink: leading always-resident tokens.
        recent: newest always-resident tokens.

    Returns:
        Boolean membership. # [N] or [S, N]
    """
    start = torch.arange(num_chunks) * chunk_size
    end = torch.as_tensor(seq_len)[..., None] - recent
    return (start >= sink) & (start + chunk_size <= end)


def golden_chunks(layer_masks: torch.Tensor, min_layers: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Chunks that at least ``min_layers`` layers put in their top-p set.

    Args:
        layer_masks: top-p membership per layer. # [L, N]
        min_layers: agreement needed.

    Returns:
        Golden chunk ids ``[G]`` and how many layers hit each of them ``[G]``.
    """
    hits = layer_masks.sum(0)
    ids = torch.nonzero(hits >= min_layers).flatten()
    return ids, hits[ids]


def to_csr(rows: list[torch.Tensor], counts: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    """Pack per-step golden ids (and hit counts) as CSR: ``indptr [S+1]``, ``indices [nnz]``, ``hits [nnz]``."""
    lengths = torch.tensor([len(r) for r in rows], dtype=torch.long)
    indptr = torch.zeros(len(rows) + 1, dtype=torch.long)
    indptr[1:] = torch.cumsum(lengths, 0)
    indices = torch.cat([r.long().cpu() for r in rows]) if rows else torch.zeros(0, dtype=torch.long)
    hits = torch.cat([c.to(torch.int16).cpu() for c in counts]) if counts else torch.zeros(0, dtype=torch.int16)
    return {"indptr": indptr, "indices": indices.to(torch.int32), "hits": hits}


def stack_peaks(peaks: list[torch.Tensor], dtype: torch.dtype = torch.float16) -> torch.Tensor:
    """Per-step chunk masses ``[..., N_s]`` (the chunk count grows as decoding goes on) as one tensor, zero-padded
    on the chunk axis. # [S, ..., N]"""
    if not peaks:
        return torch.zeros(0, 0, dtype=dtype)
    n = max(p.shape[-1] for p in peaks)
    out = torch.zeros(len(peaks), *peaks[0].shape[:-1], n, dtype=dtype)
    for s, p in enumerate(peaks):
        out[s, ..., : p.shape[-1]] = p.to(dtype).cpu()
    return out


def from_csr(csr: dict[str, torch.Tensor]) -> list[torch.Tensor]:
    """Inverse of :func:`to_csr` for the ids: one tensor of chunk ids per step."""
    ptr = csr["indptr"].tolist()
    return [csr["indices"][ptr[i] : ptr[i + 1]].long() for i in range(len(ptr) - 1)]


def lookahead_targets(golden: list[torch.Tensor], interval: int, num_chunks: int) -> torch.Tensor:
    """Target of the query at step ``t``: union of golden chunks of steps ``t+1 .. t+interval``.

    Args:
        golden: golden ids per step (step 0 is the last prompt token).
        interval: decode steps a resident set serves.
        num_chunks: chunk count of the sequence.

    Returns:
        Boolean targets for every step that has at least one later step. # [S-1, N]
    """
    hit = torch.zeros(len(golden), num_chunks, dtype=torch.bool)
    for s, ids in enumerate(golden):
        hit[s, ids[ids < num_chunks]] = True
    return _max_over_next_steps(hit, interval)


def lookahead_peak(peak: torch.Tensor, interval: int, num_chunks: int) -> torch.Tensor:
    """Strongest single-head attention a chunk gets in steps ``t+1 .. t+interval``, for every step ``t``.

    Args:
        peak: per-step peak head mass (max over layers and heads). # [S, N']
        interval: decode steps a resident set serves.
        num_chunks: chunk count of the sequence (``peak`` is cut or zero-padded to it).

    Returns:
        Lookahead peak for every step that has at least one later step. # [S-1, N]
    """
    full = torch.zeros(peak.shape[0], num_chunks, dtype=torch.float32)
    n = min(num_chunks, peak.shape[1])
    full[:, :n] = peak[:, :n].float()
    return _max_over_next_steps(full, interval)


def _max_over_next_steps(per_step: torch.Tensor, interval: int) -> torch.Tensor:
    """For every step ``t`` that has a later one, the max of ``per_step [S, N]`` over steps ``t+1 .. t+interval``
    (for booleans: whether any of them is set). # [S-1, N]"""
    out = per_step.new_zeros(max(per_step.shape[0] - 1, 0), per_step.shape[1])
    for t in range(per_step.shape[0] - 1):
        out[t] = per_step[t + 1 : t + 1 + interval].amax(0)
    return out


__all__ = [
    "chunk_mass",
    "chunk_peak",
    "decidable_chunks",
    "from_csr",
    "golden_chunks",
    "lookahead_peak",
    "lookahead_targets",
    "stack_peaks",
    "to_csr",
    "top_p_mask",
]
