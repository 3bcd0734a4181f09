"""Keys and values on disk: a folder of per-layer safetensors files and a manifest that says what they belong to.

A long document's keys and values cost a prefill to compute (minutes on a CPU, or at 512K tokens on a GPU) and
take seconds to read back. The folder is written under a temporary name and renamed when complete, so a folder
that exists is whole; the manifest lets the reader refuse keys and values of another model, dtype or prompt.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

FORMAT = 1
MANIFEST = "manifest.json"


NAME_LENGTH = 24  # hex characters of a saved folder's name


def saved_name(*parts: str) -> str:
    """The folder name of a saved context: a digest of what identifies it (model, dtype, prompt)."""
    return hashlib.sha256(":".join(parts).encode()).hexdigest()[:NAME_LENGTH]


def _is_saved_name(name: str) -> bool:
    return len(name) == NAME_LENGTH and all(c in "0123456789abcdef" for c in name)


class KVFileError(ValueError):
    """Saved keys and values that cannot be used: damaged, incomplete, or made for something else."""


def save_layers(folder: str | Path, layers: list[dict[str, torch.Tensor]], manifest: dict) -> Path:
    """Write one safetensors file per layer and ``manifest.json`` into ``folder``, atomically.

    Args:
        folder: where the files go; it must not exist yet (an existing one is left as it is and returned).
        layers: per layer, named contiguous host tensors (they may be views of one buffer).
        manifest: JSON-serialisable description; ``format`` and ``layers`` are added.

    Returns:
        ``folder``.
    """
    folder = Path(folder)
    if folder.exists():
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = folder.with_name(f".{folder.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        for i, tensors in enumerate(layers):  # one file per layer: saving copies one layer's bytes at a time
            save_file(tensors, tmp / f"layer.{i}.safetensors")
        full = {**manifest, "format": FORMAT, "layers": len(layers), "created": time.time()}
        (tmp / MANIFEST).write_text(json.dumps(full, indent=1))
        try:
            tmp.rename(folder)
        except OSError:
            if not folder.exists():  # another writer finishing first is fine: the folders are equal
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def read_manifest(folder: str | Path) -> dict:
    """The manifest of a saved folder. Raises :class:`KVFileError` when it is missing or unreadable."""
    path = Path(folder) / MANIFEST
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError:
        raise KVFileError(f"{folder} holds no {MANIFEST}: it is not a folder of saved keys and values") from None
    except (OSError, ValueError) as err:
        raise KVFileError(f"{path} is damaged ({err}); delete {folder} to compute it again") from None
    if manifest.get("format") != FORMAT:
        raise KVFileError(f"{folder} was written in format {manifest.get('format')}, this version reads {FORMAT}")
    return manifest


def load_layers(folder: str | Path, expect: dict) -> tuple[list[dict[str, torch.Tensor]], dict]:
    """Read a folder written by :func:`save_layers`, checking that its manifest agrees with ``expect``.

    Args:
        folder: the saved folder.
        expect: manifest entries that must hold these values (model fingerprint, dtype, prompt digest, ...).

    Returns:
        Per layer, its named tensors on the host; and the manifest.

    Raises:
        KVFileError: a missing or damaged file, or a manifest entry that differs from ``expect``.
    """
    folder = Path(folder)
    manifest = read_manifest(folder)
    for key, want in expect.items():
        if manifest.get(key) != want:
            raise KVFileError(
                f"the keys and values in {folder} were saved for {key} {manifest.get(key)!r}, not {want!r}"
            )
    os.utime(folder)  # the folder's time is its last use: pruning removes the longest unused first
    layers = []
    for i in range(int(manifest["layers"])):
        path = folder / f"layer.{i}.safetensors"
        try:
            layers.append(load_file(path))
        except (OSError, SafetensorError, ValueError) as err:
            raise KVFileError(f"{path} is missing or damaged ({err}); delete {folder} to compute it again") from None
    return layers, manifest


@dataclass(frozen=True, slots=True)
class SavedEntry:
    """One saved folder in a folder of saved contexts."""

    path: Path
    bytes: int
    last_used: float  # seconds since the epoch
    manifest: dict | None  # None: unreadable (it can only be removed)


def list_saved(root: str | Path) -> list[SavedEntry]:
    """The saved folders under ``root``, most recently used first.

    Only folders named as :func:`saved_name` names them count: unfinished saves and anything else in ``root`` are
    neither listed nor ever removed.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"no folder of saved contexts at {root}")
    entries = []
    for path in root.iterdir():
        if not path.is_dir() or not _is_saved_name(path.name):
            continue
        try:
            manifest = read_manifest(path)
        except KVFileError:
            manifest = None
        size = sum(f.stat().st_size for f in path.iterdir() if f.is_file())
        entries.append(SavedEntry(path, size, path.stat().st_mtime, manifest))
    return sorted(entries, key=lambda e: -e.last_used)


def prune_saved(root: str | Path, max_bytes: int) -> list[SavedEntry]:
    """Remove the longest unused folders under ``root`` until the rest take at most ``max_bytes``; returns them."""
    removed, total = [], 0
    for entry in list_saved(root):
        total += entry.bytes
        if total > max_bytes:
            shutil.rmtree(entry.path, ignore_errors=True)
            removed.append(entry)
    return removed


__all__ = [
    "KVFileError",
    "SavedEntry",
    "saved_name",
    "list_saved",
    "load_layers",
    "prune_saved",
    "read_manifest",
    "save_layers",
]
