"""One clear line for bad input instead of a traceback."""

from __future__ import annotations

import functools
import sys

from rich.console import Console
from rich.markup import escape

ERR = Console(stderr=True)

# Errors of the user's input or environment; anything else is a bug and keeps its traceback.
# MemoryError: the host could not hold the KV history (the mirror pool says how much it needed).
USER_ERRORS: tuple[type[BaseException], ...] = (
    ValueError,
    FileNotFoundError,
    NotImplementedError,
    OSError,
    MemoryError,
)


def friendly_errors(fn):
    """Turn user errors raised by ``fn`` into ``error: ...`` on stderr and exit status 2."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except USER_ERRORS as exc:
            # escaped: a message may hold brackets ("[serve]", "[0, 1]") that rich would read as markup
            ERR.print(f"[bold red]error:[/] {escape(str(exc))}", highlight=False, soft_wrap=True)
            sys.exit(2)

    return wrapper
