"""DeepSeek-V4's interleaved partial RoPE, expressed in the half-split layout the generic indexer rotates.

V4 rotates the trailing ``rope_dim`` channels of a head in interleaved pairs ``(2i, 2i+1)`` and leaves the
leading channels alone; the generic scorer (:func:`flashmemory.models.adapter.apply_rope`) rotates pairs
``(j, j + D/2)``. One fixed permutation of the channels, applied to queries and keys alike, turns the first into
the second: rope pairs become half-split pairs with V4's frequencies, and the untouched channels become pairs
with frequency zero (a rotation by angle 0). Dot products are unchanged by a common permutation, so scores are
exactly V4's.
"""

from __future__ import annotations

import torch


def half_split_permutation(head_dim: int, rope_dim: int) -> torch.Tensor:
    """Channel order that maps V4's ``[nope | interleaved rope]`` head to the half-split layout.

    Args:
        head_dim: channels per head (``D``).
        rope_dim: trailing channels carrying RoPE; ``D - rope_dim`` must be even.

    Returns:
        Index ``perm`` with ``y = x[..., perm]``. # [D]
    """
    nope = head_dim - rope_dim
    if nope < 0 or nope % 2 or rope_dim % 2:
        raise ValueError(f"cannot pair channels of a head of {head_dim} with {rope_dim} rotary channels")
    half_nope = nope // 2
    first = list(range(half_nope)) + [nope + 2 * i for i in range(rope_dim // 2)]
    second = list(range(half_nope, nope)) + [nope + 2 * i + 1 for i in range(rope_dim // 2)]
    return torch.tensor(first + second, dtype=torch.long)


def half_split_inv_freq(inv_freq: torch.Tensor, head_dim: int) -> torch.Tensor:
    """Inverse frequencies of the permuted head: zero for the former nope pairs, V4's for the rope pairs.

    Args:
        inv_freq: V4's frequencies, one per interleaved pair. # [rope_dim / 2]
        head_dim: channels per head.

    Returns:
        Frequencies per half-split pair. # [D / 2]
    """
    pad = head_dim // 2 - inv_freq.numel()
    return torch.cat([torch.zeros(pad, dtype=torch.float32), inv_freq.detach().float().cpu()])
