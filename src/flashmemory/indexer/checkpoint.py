"""Indexer checkpoints: ``model.safetensors`` (query tower) + ``config.json`` (spec naming the backbone)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .memory_indexer import IndexerSpec, MemoryIndexer

WEIGHTS, CONFIG = "model.safetensors", "config.json"
FORMAT = "flashmemory-indexer/1"
# Indexers with their own query tower, by checkpoint format: the module (imported only to read such a
# checkpoint) provides SPEC_CLASS and INDEXER_CLASS, subclasses of IndexerSpec and MemoryIndexer.
TOWER_FORMATS = {"flashmemory-indexer-deepseek-v4/1": "flashmemory.deepseek_v4.memory_indexer"}


class CheckpointError(ValueError):
    """A checkpoint is missing, corrupt, or belongs to another backbone."""


def save_indexer(
    indexer: MemoryIndexer, path: str | Path, *, extra: dict | None = None, half_matrices: bool = False
) -> Path:
    """Write ``indexer`` to the folder ``path`` (created if needed).

    ``half_matrices`` stores the weight matrices as float16: the query projections of a tower over many layers
    are nearly all of a checkpoint's bytes, and the package ships checkpoints. Biases, the distance prior and the
    rotary frequencies (whose rounding would shift every angle) stay float32; loading gives float32 weights.
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    halved = {n for n, p in indexer.named_parameters() if half_matrices and n.endswith(".weight") and p.dim() == 2}
    tensors = {
        k: v.detach().to(torch.float16 if k in halved else torch.float32).cpu().contiguous()
        for k, v in indexer.state_dict().items()
    }
    save_file(tensors, path / WEIGHTS)
    meta = {"format": getattr(indexer, "checkpoint_format", FORMAT), "spec": indexer.spec.to_dict(), **(extra or {})}
    (path / CONFIG).write_text(json.dumps(meta, indent=2))
    return path


def check_checkpoint_out(path: str | Path, *, overwrite: bool = False) -> Path:
    """Refuse a folder that cannot take a new checkpoint, before the work that would make it.

    The partial checkpoint an interrupted training run left is not protected: running again is how it is finished.

    Raises:
        CheckpointError: ``path`` is a file, or already holds a checkpoint and ``overwrite`` is False.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise CheckpointError(f"{path} exists and is not a folder; a checkpoint is written as a folder")
    if overwrite or not ((path / CONFIG).exists() or (path / WEIGHTS).exists()):
        return path
    try:
        partial = json.loads((path / CONFIG).read_text()).get("training", {}).get("partial", False)
    except (OSError, ValueError, AttributeError):
        partial = False
    if not partial:
        raise CheckpointError(
            f"{path} already holds a checkpoint; choose another folder or allow overwriting it (--overwrite)"
        )
    return path


def checkpoint_identity(path: str | Path) -> str:
    """``"<folder>@<first 12 hex of a sha256>"`` of a checkpoint, a label for records: the hash covers the weights and
    the spec (settings such as the prior's reach or the head's page share change the scores too), so results made
    with one checkpoint are never mixed with another's.

    Raises:
        CheckpointError: for a folder without a readable checkpoint.
    """
    path = Path(path)
    try:
        spec = json.loads((path / CONFIG).read_text())["spec"]
        weights = sorted(path.glob("*.safetensors"))
    except (OSError, json.JSONDecodeError, KeyError, TypeError):
        raise CheckpointError(f"{path} holds no readable indexer checkpoint ({CONFIG} with a spec)") from None
    if not weights:
        raise CheckpointError(f"{path} holds no indexer weights ({WEIGHTS})")
    digest = hashlib.sha256()
    for weight in weights:
        digest.update(weight.read_bytes())
    digest.update(json.dumps(spec, sort_keys=True).encode())
    return f"{path.resolve().name}@{digest.hexdigest()[:12]}"


def load_indexer(
    path: str | Path,
    *,
    fingerprint: str | None = None,
    device: str | torch.device = "cpu",
    strict: bool = True,
) -> MemoryIndexer:
    """Read an indexer folder.

    Args:
        path: folder written by :func:`save_indexer`.
        fingerprint: the backbone's fingerprint; a different one in the checkpoint raises (or warns when
            ``strict`` is False).
        device: where to put the weights.
        strict: refuse a fingerprint mismatch instead of warning.
    """
    path = Path(path)
    if not (path / CONFIG).is_file() or not (path / WEIGHTS).is_file():
        raise CheckpointError(f"{path} is not an indexer checkpoint (needs {CONFIG} and {WEIGHTS})")
    try:
        meta = json.loads((path / CONFIG).read_text())
        spec_class, indexer_class = _classes(meta.get("format"), path)
        spec = spec_class(**meta["spec"])
    except (json.JSONDecodeError, KeyError, TypeError, AttributeError, ValueError) as exc:
        raise CheckpointError(f"{path / CONFIG} is corrupt: {exc}") from None
    if fingerprint is not None and spec.fingerprint and spec.fingerprint != fingerprint:
        message = (
            f"indexer checkpoint {path} was trained for backbone {spec.backbone!r} (fingerprint "
            f"{spec.fingerprint}), but the model has fingerprint {fingerprint}"
        )
        if strict:
            raise CheckpointError(message)
        import warnings

        warnings.warn(message, stacklevel=2)
    try:
        state = load_file(path / WEIGHTS)
    except (SafetensorError, OSError) as exc:
        raise CheckpointError(f"{path / WEIGHTS} is corrupt: {exc}") from None
    indexer = indexer_class(spec)
    missing, unexpected = indexer.load_state_dict(state, strict=False)
    missing = [k for k in missing if k != "distance_bias"]  # absent from zero-shot checkpoints: stays zero
    if missing or unexpected:
        raise CheckpointError(f"{path / WEIGHTS} does not match its config: missing {missing}, unexpected {unexpected}")
    return indexer.to(device)


def _classes(fmt: str | None, path: Path) -> tuple[type, type]:
    if fmt == FORMAT:
        return IndexerSpec, MemoryIndexer
    if fmt in TOWER_FORMATS:
        from importlib import import_module

        module = import_module(TOWER_FORMATS[fmt])
        return module.SPEC_CLASS, module.INDEXER_CLASS
    raise CheckpointError(f"{path} has format {fmt!r}, expected {FORMAT!r} or one of {sorted(TOWER_FORMATS)}")


def blend_states(start: dict[str, torch.Tensor], end: dict[str, torch.Tensor], weight: float) -> dict:
    """``start + weight * (end - start)`` of two state dicts with the same tensors."""
    return {k: start[k] + weight * (end[k] - start[k]) for k in end}


def blend_indexers(
    start: str | Path, end: str | Path, weight: float, out: str | Path, *, overwrite: bool = False
) -> Path:
    """Write ``start + weight * (end - start)`` of two checkpoints of one indexer shape to ``out``.

    Weight-space interpolation between, typically, the zero-shot indexer of a dump (``DUMP/init_indexer``) and a
    trained checkpoint: what ``train --interpolate`` does at the end of training, done afterwards, so that a
    blend can be chosen on a dev split without training again. ``weight`` 0 gives ``start``, 1 gives ``end``.

    Raises:
        CheckpointError: a checkpoint is missing or corrupt, or the two differ in backbone, layers or shape;
            ``out`` already holds a checkpoint and ``overwrite`` is False.
        ValueError: ``weight`` outside [0, 1].
    """
    if not 0.0 <= weight <= 1.0:
        raise ValueError(f"weight must be in [0, 1], got {weight}")
    check_checkpoint_out(out, overwrite=overwrite)
    start, end, out = Path(start), Path(end), Path(out)
    a, b = load_indexer(start), load_indexer(end)
    own = ("trained", "prior_buckets", "layer_reduce")  # what training sets, not the shape: the blend takes end's
    spec_a = {k: v for k, v in a.spec.to_dict().items() if k not in own}
    spec_b = {k: v for k, v in b.spec.to_dict().items() if k not in own}
    if type(a) is not type(b) or spec_a != spec_b:
        diff = sorted(k for k in spec_a.keys() | spec_b.keys() if spec_a.get(k) != spec_b.get(k))
        raise CheckpointError(f"{start} and {end} are not the same indexer shape (they differ in {diff or 'kind'})")
    with torch.no_grad():
        b.load_state_dict(blend_states(a.state_dict(), b.state_dict(), weight))
    b.spec.trained = a.spec.trained or b.spec.trained
    # a blended prior is only as trustworthy as far as both priors reach (an untrained one is zero everywhere)
    reaches = [r for r in (a.spec.prior_buckets, b.spec.prior_buckets) if r is not None]
    b.spec.prior_buckets = min(reaches) if reaches else None
    meta = json.loads((end / CONFIG).read_text())
    extra = {k: v for k, v in meta.items() if k not in ("format", "spec")}
    extra["blend"] = {"start": str(start), "end": str(end), "weight": weight}
    return save_indexer(b, out, extra=extra)
