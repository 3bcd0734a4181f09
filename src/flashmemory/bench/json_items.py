"""Reading a published data set that is one JSON list of items (LongBench-v2's ``data.json``, LongMemEval's files)."""

from __future__ import annotations

import functools
import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

Item = TypeVar("Item")


def load_json_items(path: str | Path, label: str, parse_item: Callable[[Any, str], Item]) -> list[Item]:
    """Read a JSON list of items and check each one with ``parse_item``, in file order.

    A file is parsed once while its size and modification time stay the same; a benchmark asks for the same file
    once per task and length.

    Args:
        path: the data file.
        label: how errors name the data set (``"LongBench-v2"``, ``"LongMemEval"``).
        parse_item: ``(record, where) -> item``; raises ValueError naming ``where`` for a bad record. It must be
            hashable (a module-level function), being part of the cache key.

    Raises:
        FileNotFoundError: no such file.
        ValueError: not UTF-8 JSON, not a list, an empty list, or an item that ``parse_item`` refuses.
    """
    path = Path(path).expanduser().resolve()
    if not path.is_file():
        raise FileNotFoundError(f"{label} data file {path} does not exist")
    stat = path.stat()
    return list(_load(path, stat.st_size, stat.st_mtime_ns, label, parse_item))


def require_fields(record: Any, fields: Sequence[str], where: str) -> None:
    """Check that one record is a JSON object holding every one of ``fields``.

    Raises:
        ValueError: naming ``where`` and the fields that are missing (or all of them, for a record not an object).
    """
    if not isinstance(record, dict):
        raise ValueError(f"{where}: expected an object with fields {', '.join(fields)}, got {type(record).__name__}")
    missing = [f for f in fields if f not in record]
    if missing:
        raise ValueError(f"{where}: missing field(s) {', '.join(missing)}")


@functools.lru_cache(maxsize=4)
def _load(path: Path, size: int, mtime_ns: int, label: str, parse_item: Callable[[Any, str], Any]) -> tuple:
    # Size and mtime are part of the key so that an edited file is read again.
    try:
        records = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"{label} data file {path} is not valid JSON ({err})") from None
    except UnicodeDecodeError:
        raise ValueError(f"{label} data file {path} is not UTF-8 text") from None
    if not isinstance(records, list):
        raise ValueError(f"{label} data file {path} must hold a JSON list of items, got {type(records).__name__}")
    if not records:
        raise ValueError(f"{label} data file {path} holds no items")
    return tuple(parse_item(r, f"{path}: item {i}") for i, r in enumerate(records))


__all__ = ["load_json_items", "require_fields"]
