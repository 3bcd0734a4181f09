"""Chunk scores ``sigmoid(sum_h w_h * relu(q_h . k_h) + b)`` and page selection from them."""

from __future__ import annotations

import math

import torch

from ..memory.host_rows import keys_to_device


def chunk_logits(q: torch.Tensor, w: torch.Tensor, bias: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """Pre-sigmoid score of every chunk for one target layer, per query token.

    Args:
        q: rotated queries of ``W`` lookahead tokens. # [B, W, H, D]
        w: head weights. # [B, W, H]
        bias: scalar score bias.
        keys: chunk keys; query head ``h`` reads KV head ``h // (H / Hkv)``. # [B, Hkv, N, D]

    Returns:
        Logits. # [B, W, N]
    """
    b, t, h, d = q.shape
    hkv = keys.shape[1]
    qg = q.reshape(b, t, hkv, h // hkv, d).to(keys.dtype)
    dots = torch.einsum("bwkgd,bknd->bwkgn", qg, keys).float() / math.sqrt(d)  # [B, W, Hkv, G, N]
    weighted = torch.relu(dots) * w.reshape(b, t, hkv, h // hkv, 1).float()
    return weighted.sum((2, 3)) + bias.float()


def token_chunk_logits(
    q: torch.Tensor,
    w: torch.Tensor,
    bias: torch.Tensor,
    token_keys: torch.Tensor,
    chunk_size: int,
    num_chunks: int,
    pad_len: torch.Tensor | None = None,
    block_chunks: int = 1024,
) -> torch.Tensor:
    """Pre-sigmoid score of every chunk as the best score of its tokens, per query token.

    A chunk's mean key blurs the few tokens a question matches (a key among many like it) with the rest of the
    chunk; scoring each token keeps them apart. Computed over blocks of chunks so the per-token scores of a long
    prompt never exist at once; keys held elsewhere (the host mirror) are copied to ``q``'s device one block at a
    time.

    Args:
        q: rotated queries of ``W`` lookahead tokens. # [B, W, H, D]
        w: head weights. # [B, W, H]
        bias: scalar score bias.
        token_keys: keys of positions ``0 .. T-1``, ``T >= num_chunks * chunk_size``, on any device. # [B, Hkv, T, D]
        chunk_size: tokens per chunk.
        num_chunks: chunks to score (the complete chunks).
        pad_len: left padding per sequence; padding tokens never score. # [B]
        block_chunks: chunks scored per block.

    Returns:
        Logits; ``-inf`` for chunks of padding only. # [B, W, N]
    """
    b, t = q.shape[:2]
    out = []
    for c0 in range(0, num_chunks, block_chunks):
        c1 = min(num_chunks, c0 + block_chunks)
        block = keys_to_device(token_keys[:, :, c0 * chunk_size : c1 * chunk_size], q.device)
        logits = chunk_logits(q, w, bias, block)  # [B, W, n*C]
        if pad_len is not None:
            pos = torch.arange(c0 * chunk_size, c1 * chunk_size, device=logits.device)
            padding = pos[None, :] < pad_len.to(logits.device)[:, None]  # [B, n*C]
            logits = logits.masked_fill(padding[:, None, :], float("-inf"))
        out.append(logits.view(b, t, c1 - c0, chunk_size).amax(-1))
    if not out:
        return q.new_zeros(b, t, 0, dtype=torch.float32)
    return torch.cat(out, -1)


def follow_scores(scores: torch.Tensor, follow: int) -> torch.Tensor:
    """Each chunk's score raised to the best of the ``follow`` chunks before it.

    A query matches the words it asks about (a key, a name); what it needs next is often the text just after them
    (the value). When a page boundary separates the two, the page holding the value would otherwise compete on its
    own, weaker, scores.

    Args:
        scores: chunk probabilities or logits, in sequence order. # [B, N]
        follow: how many following chunks inherit a chunk's score; 0 returns ``scores``.

    Returns:
        Scores. # [B, N]
    """
    out = scores
    for shift in range(1, min(follow, scores.shape[-1] - 1) + 1):
        out = torch.cat([out[..., :shift], torch.maximum(out[..., shift:], scores[..., :-shift])], dim=-1)
    return out


def select_pages(
    scores: torch.Tensor,
    *,
    num_selectable: int,
    page_chunks: int,
    num_slots: int,
    threshold: float,
    valid_chunks: torch.Tensor | None = None,
    top_m: int | None = None,
    by_rank: bool = False,
    best_scores: torch.Tensor | None = None,
) -> torch.Tensor:
    """Fill the page slots: pages holding the best chunks first, then the densest pages.

    Pages are ranked two ways: by their best chunk score (the top-m fallback, which keeps precise retrieval
    working when a single chunk matters, or when the threshold keeps too many or too few chunks) and by
    density, the number of chunks above ``threshold`` (ties broken by the best chunk). The first ``top_m``
    slots take the best pages of the first ranking, the others the best remaining pages of the second.

    Args:
        scores: chunk probabilities. # [B, N]
        num_selectable: pages that may be chosen (complete and before the recent tail).
        page_chunks: chunks per page.
        num_slots: page slots to fill (``K``).
        threshold: probability above which a chunk counts as kept.
        valid_chunks: False for chunks that hold no real token (padding). # [B, N]
        top_m: slots given to the best-chunk ranking. Default: half the slots, rounded up.
        by_rank: return the pages in the order they were chosen (best-chunk picks, then density picks) instead of
            sorted, for callers that may keep only a prefix.
        best_scores: other chunk scores that rank the first ``top_m`` slots instead of ``scores`` (an indexer with
            a feedback head: its tower's scores find a needle that no attention has looked at yet). # [B, N]

    Returns:
        Page ids per slot, -1 where nothing is left to choose. # [B, K]
    """
    b, n = scores.shape
    usable = min(num_selectable, n // page_chunks)
    out = torch.full((b, num_slots), -1, dtype=torch.long, device=scores.device)
    if usable <= 0 or num_slots <= 0:
        return out
    s = scores[:, : usable * page_chunks].float()
    if valid_chunks is not None:
        s = s.masked_fill(~valid_chunks[:, : usable * page_chunks], float("-inf"))
    pages = s.view(b, usable, page_chunks)
    best = pages.amax(-1)  # [B, P]
    empty = best == float("-inf")
    density = ((pages > threshold).sum(-1).float() + best.clamp(min=0.0, max=0.999)).masked_fill(empty, float("-inf"))
    if best_scores is not None:
        other = best_scores[:, : usable * page_chunks].float()
        if valid_chunks is not None:
            other = other.masked_fill(~valid_chunks[:, : usable * page_chunks], float("-inf"))
        best = other.view(b, usable, page_chunks).amax(-1)
    k = min(num_slots, usable)
    m = min(k, (k + 1) // 2 if top_m is None else top_m)
    first = best.topk(m, dim=-1).indices  # [B, m]
    density = density.scatter(1, first, float("-inf"))
    top_rest = density.topk(k - m, dim=-1)
    rest = torch.where(top_rest.values > float("-inf"), top_rest.indices, -1)  # [B, k-m]
    first = torch.where(torch.gather(empty, 1, first), -1, first)
    chosen = torch.cat([first, rest], dim=1)
    out[:, :k] = chosen if by_rank else chosen.sort(dim=-1).values
    return out
