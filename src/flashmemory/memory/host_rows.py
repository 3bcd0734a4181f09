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


class StagedWriter:
    """Writes short device blocks into token-axis slices of a pinned host tensor through one pinned staging buffer.

    A cycle boundary flushes ``interval`` new tokens per (sequence, head): rows of a few KB, too short for
    :func:`copy_rows` (one transfer per row costs more than it moves), and a single ``copy_`` into the strided slice
    bounces through pageable memory. Copying every block into one contiguous pinned buffer runs at the link's
    speed, and the host then scatters it into the slices. On an H200 host, for an 8B Llama's 64-token flush at
    128K: 45 ms at batch 43 against 103 ms for one copy per block and 303 ms by rows; 4.4 against 19.8 and 9.3 ms
    at batch 1 (``benchmarks/results/mirror_flush_copy_h200/``).

    The buffer is kept between calls and grows when a flush needs more room than any before; each flush uses a
    contiguous view of its front, so that every staging copy has a contiguous pinned destination.
    """

    def __init__(self) -> None:
        self._flat: torch.Tensor | None = None

    def write(self, pairs: list[tuple[torch.Tensor, torch.Tensor]], stream: torch.cuda.Stream | None = None) -> None:
        """Copy each ``src`` into its ``out``; returns once every ``out`` holds its values.

        Args:
            pairs: ``(src, out)`` blocks of one shape and dtype; ``src`` on the device, ``out`` a slice of a host
                tensor. # [B, H, L, D] each
            stream: the stream the sources are ready on (the current stream when None); the staging copies are
                queued on it and awaited there.
        """
        if not pairs:
            return
        src0 = pairs[0][0]
        shape = (len(pairs), *src0.shape)
        numel = len(pairs) * src0.numel()
        flat = self._flat
        if flat is None or flat.dtype != src0.dtype or flat.numel() < numel:
            flat = self._flat = torch.empty(numel, dtype=src0.dtype, pin_memory=src0.is_cuda)
        buf = flat[:numel].view(shape)
        for i, (src, _) in enumerate(pairs):
            buf[i].copy_(src, non_blocking=True)
        if src0.is_cuda:
            (stream or torch.cuda.current_stream(src0.device)).synchronize()
        for i, (_, out) in enumerate(pairs):
            out.copy_(buf[i])
