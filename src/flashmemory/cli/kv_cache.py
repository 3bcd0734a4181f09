"""``flashmemory kv-cache``: what a folder of saved contexts holds, and pruning it to a size."""

from __future__ import annotations

import json
import time
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from .errors import friendly_errors

OUT = Console()


@friendly_errors
def kv_cache(
    folder: Path = typer.Argument(..., help="The folder given to ask --kv-cache, serve --kv-cache or Session."),
    max_gib: float = typer.Option(
        None, help="Remove the longest unused saved contexts until the rest take at most this many GiB."
    ),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object per saved context."),
) -> None:
    """List the saved contexts of a --kv-cache folder (most recently used first), or prune it to a size."""
    from ..memory.kv_files import list_saved, prune_saved

    if max_gib is not None:
        if max_gib < 0:
            raise ValueError(f"--max-gib must be >= 0, got {max_gib}")
        for entry in prune_saved(folder, int(max_gib * 2**30)):
            if not as_json:
                OUT.print(f"[dim]removed {entry.path.name} ({entry.bytes / 2**20:,.1f} MiB)[/]")
    entries = list_saved(folder)
    if as_json:
        for e in entries:
            print(json.dumps({"folder": str(e.path), "bytes": e.bytes, "last_used": e.last_used, **(e.manifest or {})}))
        return
    table = Table(title=f"{folder}: {len(entries)} saved, {sum(e.bytes for e in entries) / 2**30:,.2f} GiB")
    for col in ("folder", "tokens", "dtype", "model", "size", "last used"):
        table.add_column(col, justify="right" if col in ("tokens", "size") else "left")
    now = time.time()
    for e in entries:
        m = e.manifest or {}
        table.add_row(
            e.path.name,
            f"{m['length']:,}" if "length" in m else "?",
            m.get("dtype", "?"),
            m.get("fingerprint", "damaged: remove it"),
            f"{e.bytes / 2**20:,.1f} MiB",
            _ago(now - e.last_used),
        )
    OUT.print(table)


def _ago(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size:
            return f"{seconds / size:.0f} {unit} ago"
    return "just now"
