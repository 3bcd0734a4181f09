"""Indexer checkpoints shipped inside the package, found by the backbone's fingerprint."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import torch
from torch import nn

from ..models.adapter import backbone_spec
from ..models.loader import model_fingerprint
from .checkpoint import CONFIG, checkpoint_identity, load_indexer
from .memory_indexer import MemoryIndexer

SHIPPED_DIR = Path(__file__).resolve().parent.parent / "checkpoints"


def shipped_checkpoints() -> dict[str, dict]:
    """``{folder name: spec}`` of every checkpoint shipped with the package."""
    out = {}
    for config in sorted(SHIPPED_DIR.glob(f"*/{CONFIG}")):
        out[config.parent.name] = json.loads(config.read_text())["spec"]
    return out


def matching_checkpoint(shipped: dict[str, dict], fingerprint: str) -> str | None:
    """Folder name among ``shipped`` (:func:`shipped_checkpoints`) made for the backbone with this fingerprint."""
    return next((name for name, ck in shipped.items() if ck["fingerprint"] == fingerprint), None)


def shipped_target_layers(model: nn.Module) -> tuple[int, ...] | None:
    """The layers read by the shipped checkpoint that ``resolve_indexer(model, "auto")`` picks; None if none."""
    shipped = shipped_checkpoints()
    name = matching_checkpoint(shipped, model_fingerprint(model)) if shipped else None
    return None if name is None else tuple(shipped[name]["target_layers"])


def shipped_identity(model: nn.Module) -> str:
    """What ``resolve_indexer(model, "auto")`` picks, as a label for records.

    Returns:
        ``"zero-shot"``, or ``"<folder>@<first 12 hex of a sha256>"`` for the shipped checkpoint that matches the
        model's fingerprint, so a result made with one checkpoint is never mixed with another's. The hash covers the
        weights and the spec (settings such as the prior's reach or the head's page share change the scores too).
    """
    shipped = shipped_checkpoints()
    if not shipped:
        return "zero-shot"  # nothing to match: skip hashing the weights
    name = matching_checkpoint(shipped, model_fingerprint(model))
    if name is None:
        return "zero-shot"
    return checkpoint_identity(SHIPPED_DIR / name)


def resolve_indexer(model: nn.Module, indexer: str | Path | MemoryIndexer | None) -> MemoryIndexer | None:
    """Turn the ``indexer`` argument of the runtime into an indexer.

    Args:
        model: the backbone.
        indexer: ``"auto"`` (the shipped checkpoint whose fingerprint matches the model, else zero-shot),
            ``"zero-shot"`` / None (built from the model's ``q_proj``), a checkpoint folder, or an indexer.

    Returns:
        An indexer on the model's device, or None for the zero-shot one.
    """
    if indexer is None or isinstance(indexer, MemoryIndexer) or indexer == "zero-shot":
        return None if indexer == "zero-shot" else indexer
    shipped = shipped_checkpoints() if indexer == "auto" else {}
    if indexer == "auto" and not shipped:
        return None  # nothing to match: skip hashing the weights on every call
    device = next(model.parameters()).device
    fingerprint = model_fingerprint(model)
    if indexer != "auto":
        return load_indexer(indexer, fingerprint=fingerprint, device=device)
    name = matching_checkpoint(shipped, fingerprint)
    if name is not None:
        return load_indexer(SHIPPED_DIR / name, fingerprint=fingerprint, device=device).to(torch.float32)
    # only when nothing matches: a checkpoint of the same shape suggests the user expected it to apply
    spec = backbone_spec(model)
    for other, ck in shipped.items():
        if (ck["hidden_size"], ck["num_heads"], ck["num_kv_heads"]) == (
            spec.hidden_size,
            spec.num_heads,
            spec.num_kv_heads,
        ):
            warnings.warn(
                f"the shipped indexer {other!r} has this model's shape but another fingerprint "
                f"({ck['fingerprint']} vs {fingerprint}); using the zero-shot indexer instead",
                stacklevel=2,
            )
    return None
