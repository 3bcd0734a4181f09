"""Copies between the device and token-axis slices of the host mirror that stay direct and asynchronous.

A slice along the token axis of a ``[B, H, T, D]`` mirror is not contiguous. ``Tensor.copy_`` and ``Tensor.to``
move such a tensor through a fresh contiguous host buffer, which is pageable: the transfer becomes synchronous and
the CPU gathers or scatters every byte once more. Scoring one boundary by token keys read that way took 1.07 s on
an H200 host (8B Llama shape, 9 target layers, 128K) against 58 ms row by row
(``benchmarks/results/decode_speed_fused_h200/``). Each ``(sequence, head)`` row of such a slice is contiguous, so
copying rows keeps every transfer a direct one to or from the mirror's pinned pages.
"""

from __future__ import annotations

import torch


def copy_rows(src: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """Copy ``src`` into ``out`` one contiguous ``[L, D]`` row per (sequence, head); returns ``out``.

    Each row of the host side (a token-axis slice of the mirror) is contiguous, so each row copy is one direct
    transfer; a strided row on the device side is made contiguous there.

    Args:
        src: the source, on any device. # [B, H, L, D]
        out: the destination, on any device. # [B, H, L, D]
    """
    if src.shape != out.shape:
        raise ValueError(f"copy_rows needs equal shapes, got {tuple(src.shape)} and {tuple(out.shape)}")
    for b in range(src.shape[0]):
        for h in range(src.shape[1]):
            out[b, h].copy_(src[b, h], non_blocking=True)
    return out


def copy_to_host_slice(src: torch.Tensor, out: torch.Tensor) -> None:
    """Write device tensor ``src`` into ``out``, a token-axis slice of a host tensor, without a pageable bounce.

    Rows are worth their launches only across devices: a same-device copy, or one into a contiguous ``out``, is a
    single ``copy_``.

    Args:
        src: keys or values of a block of positions. # [B, H, L, D]
        out: where they go in the mirror. # [B, H, L, D]
    """
    if src.device == out.device or out.is_contiguous():
        out.copy_(src, non_blocking=True)
    else:
        copy_rows(src, out)


def keys_to_device(keys: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``keys`` on ``device``, copied one (sequence, head) row at a time when they are a slice of a host tensor.

    The read of :func:`copy_to_host_slice`'s writes: the scorer's token keys come back from the mirror this way.

    Args:
        keys: keys of a block of positions, on any device. # [B, Hkv, L, D]
        device: where they are needed.

    Returns:
        The keys on ``device`` (``keys`` itself when already there). # [B, Hkv, L, D]
    """
    if keys.device == device:
        return keys
    if keys.is_contiguous():
        return keys.to(device, non_blocking=True)
    return copy_rows(keys, torch.empty(keys.shape, dtype=keys.dtype, device=device))
