"""Public sparse decode op: picks the Triton kernel on CUDA when Triton is importable, else the torch reference."""

from __future__ import annotations

import importlib.util
from functools import cache

import torch

from .sparse_decode_ref import ResidentSet, naive_sparse_decode

BACKENDS = ("auto", "triton", "torch")


@cache
def triton_available() -> bool:
    """True when the ``triton`` package can be imported (it is optional)."""
    return importlib.util.find_spec("triton") is not None


def resolve_backend(backend: str, device: torch.device) -> str:
    """Map ``"auto"`` to ``"triton"`` on CUDA with Triton installed and to ``"torch"`` otherwise."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown sparse decode backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    if backend == "auto":
        return "triton" if device.type == "cuda" and triton_available() else "torch"
    if backend == "triton" and not triton_available():
        raise ValueError("sparse decode backend 'triton' needs the triton package (pip install triton)")
    return backend


def sparse_decode(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    rs: ResidentSet,
    scale: float | None = None,
    *,
    backend: str = "auto",
) -> torch.Tensor:
    """Attention of one decode query per sequence over the resident slots of an LSA reserve.

    Args:
        q: query of the newest token. # [B, Hq, D]
        k: reserve keys ``[sink | K pages | tail]``; any strides with a contiguous last dimension. # [B, Hkv, S, D]
        v: reserve values. # [B, Hkv, S, D]
        rs: page table and per-sequence bounds (:class:`ResidentSet`).
        scale: logit scale. Default: ``D ** -0.5``.
        backend: ``"auto"``, ``"triton"`` or ``"torch"``. Default: "auto".

    Returns:
        Attention output. # [B, Hq, D]
    """
    if resolve_backend(backend, q.device) == "triton":
        from .sparse_decode_triton import sparse_decode_triton

        return sparse_decode_triton(q, k, v, rs, scale)
    return naive_sparse_decode(q, k, v, rs, scale)
