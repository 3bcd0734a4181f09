"""Provenance of a recorded result: which machine and which commit produced it."""

from __future__ import annotations

import os
import platform
import subprocess
from pathlib import Path

import torch


def machine_description() -> str:
    """The accelerator (or CPU) and the torch version, in words."""
    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name()} (torch {torch.__version__})"
    return f"{platform.machine()} CPU, {os.cpu_count()} cores (torch {torch.__version__})"


def git_commit() -> str:
    """Short commit of the working tree; ``FLASHMEMORY_COMMIT`` wins (copies of a tree may lack ``.git``)."""
    if os.environ.get("FLASHMEMORY_COMMIT"):
        return os.environ["FLASHMEMORY_COMMIT"]
    # the current folder first, then the package's own (an editable install run from elsewhere)
    for where in (None, Path(__file__).resolve().parent):
        try:
            return subprocess.check_output(
                ["git", "rev-parse", "--short", "HEAD"], text=True, stderr=subprocess.DEVNULL, cwd=where
            ).strip()
        except (OSError, subprocess.CalledProcessError):
            continue
    return "unknown"


def command_line(script: str, args: dict) -> str:
    """The command that reproduces a run from its parsed arguments.

    A list repeats its flag once per value; ``True`` is a bare switch (``store_true``), and ``False`` or ``None``
    leaves the flag out.
    """
    flags = []
    for key, value in args.items():
        flag = f"--{key.replace('_', '-')}"
        for v in value if isinstance(value, list) else [value]:
            if v is True:
                flags.append(flag)
            elif v is not None and v is not False:
                flags.append(f"{flag} {v}")
    return f"python {script} {' '.join(flags)}"


def provenance(script: str, args: dict) -> dict[str, str]:
    """``command``, ``commit`` and ``machine`` of a benchmark script's run, to head its recorded JSON."""
    return {"command": command_line(script, args), "commit": git_commit(), "machine": machine_description()}


def provenance_lines(report: dict) -> list[str]:
    """The markdown bullets of a report's :func:`provenance`, to head its recorded table."""
    return [f"- command: `{report['command']}`", f"- commit: `{report['commit']}`", f"- machine: {report['machine']}"]
