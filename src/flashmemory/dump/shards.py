"""Dump folders: ``manifest.json`` + ``shard-XXXXX.safetensors`` + ``init_indexer/``; written atomically."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

FORMAT = "flashmemory-dump/1"
MANIFEST = "manifest.json"
RECORD_KEYS = (
    "hidden",
    "positions",
    "tokens",
    "indptr",
    "indices",
    "hits",
    "chunk_keys",
    "chunk_kmin",
    "chunk_kmax",
)


class DumpError(ValueError):
    """A dump folder is missing, corrupt or inconsistent."""


def write_json_atomic(path: Path, data: dict) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=1))
    os.replace(tmp, path)


def write_shard(path: Path, records: dict[str, dict[str, torch.Tensor]]) -> None:
    """Write ``{prompt_key: record}`` into one safetensors file (temp file, then rename)."""
    flat = {f"{key}/{name}": t.contiguous() for key, rec in records.items() for name, t in rec.items()}
    tmp = path.with_suffix(".tmp")
    save_file(flat, tmp)
    os.replace(tmp, path)


def read_manifest(folder: str | Path) -> dict:
    folder = Path(folder)
    path = folder / MANIFEST
    if not path.is_file():
        raise DumpError(f"{folder} is not a dump folder (no {MANIFEST})")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise DumpError(f"{path} is corrupt: {exc}") from None
    if manifest.get("format") != FORMAT:
        raise DumpError(f"{path} has format {manifest.get('format')!r}, expected {FORMAT!r}")
    return manifest


def read_shard(path: Path) -> dict[str, dict[str, torch.Tensor]]:
    """Records of one shard, grouped by prompt key."""
    if not path.is_file():
        raise DumpError(f"dump shard {path} is missing")
    try:
        flat = load_file(path)
    except (SafetensorError, OSError) as exc:
        raise DumpError(f"dump shard {path} is corrupt: {exc}") from None
    records: dict[str, dict[str, torch.Tensor]] = {}
    for name, tensor in flat.items():
        key, field = name.split("/", 1)
        records.setdefault(key, {})[field] = tensor
    for key, rec in records.items():
        missing = [k for k in RECORD_KEYS if k not in rec]
        if missing:
            raise DumpError(f"dump shard {path} record {key} lacks {missing}")
    return records


def iter_records(folder: str | Path, split: str | None = None) -> Iterator[tuple[dict, dict[str, torch.Tensor]]]:
    """``(prompt_meta, record)`` for every finished prompt of a dump folder, optionally of one split."""
    folder = Path(folder)
    manifest = read_manifest(folder)
    by_shard: dict[str, list[dict]] = {}
    for meta in manifest["prompts"]:
        if split is None or meta.get("split") == split:
            by_shard.setdefault(meta["shard"], []).append(meta)
    for shard, metas in sorted(by_shard.items()):
        records = read_shard(folder / shard)
        for meta in metas:
            if meta["key"] not in records:
                raise DumpError(f"dump shard {folder / shard} lacks prompt {meta['key']}")
            yield meta, records[meta["key"]]
