"""Frozen key tower: one key per chunk and KV head, the mean of the chunk's post-RoPE keys."""

from __future__ import annotations

import torch


def chunk_means(keys: torch.Tensor, start: int, chunk_size: int, pad_len: torch.Tensor) -> torch.Tensor:
    """Mean key of every complete chunk of ``keys``, ignoring left padding.

    Args:
        keys: keys of positions ``start .. start + n * chunk_size``. # [B, H, n*C, D]
        start: absolute position of the first key (a multiple of ``chunk_size``).
        chunk_size: tokens per chunk.
        pad_len: left-padding tokens per sequence. # [B]

    Returns:
        Mean over the non-padding tokens of each chunk; zeros for all-padding chunks. # [B, H, n, D]
    """
    b, h, t, d = keys.shape
    n = t // chunk_size
    pos = start + torch.arange(n * chunk_size, device=keys.device)
    valid = (pos[None, :] >= pad_len.to(keys.device)[:, None]).to(torch.float32)  # [B, n*C]
    valid = valid.view(b, 1, n, chunk_size, 1)
    blocks = keys[:, :, : n * chunk_size].view(b, h, n, chunk_size, d).to(torch.float32)
    total = (blocks * valid).sum(3)
    count = valid.sum(3).clamp(min=1.0)
    return (total / count).to(keys.dtype)


class ChunkKeys:
    """Chunk keys of the target layers, kept on the device and grown as chunks complete.

    Args:
        layers: target layer indices.
        chunk_size: tokens per chunk.
    """

    def __init__(self, layers: tuple[int, ...], chunk_size: int) -> None:
        self.layers = tuple(layers)
        self.chunk_size = chunk_size
        self.keys: dict[int, torch.Tensor] = {}
        self.num_chunks = 0

    def extend(self, layer: int, keys: torch.Tensor, start: int, pad_len: torch.Tensor, device: torch.device) -> None:
        """Append the chunk keys of complete chunks of ``keys`` (positions from ``start``) for ``layer``."""
        new = chunk_means(keys, start, self.chunk_size, pad_len).to(device)
        first = start // self.chunk_size
        old = self.keys.get(layer)
        if old is None:
            self.keys[layer] = new
        else:
            if old.shape[2] != first:
                raise RuntimeError(f"chunk keys of layer {layer} are not contiguous: have {old.shape[2]}, got {first}")
            self.keys[layer] = torch.cat([old, new], dim=2)
        if layer == self.layers[-1]:
            self.num_chunks = self.keys[layer].shape[2]

    def stacked(self) -> list[torch.Tensor]:
        """Keys per target layer, in target order. # L x [B, Hkv, N, D]"""
        return [self.keys[layer] for layer in self.layers]

    def device_tensors(self) -> list[torch.Tensor]:
        return list(self.keys.values())
