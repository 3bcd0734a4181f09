"""The ``--cuda-graph/--eager`` option that ``ask`` and ``serve`` share."""

from __future__ import annotations

import typer


def cuda_graph_option():
    """Unset (None) replays LSA's decode steps whenever the model and device allow; the flags require or forbid it
    (:func:`~flashmemory.runtime.graph_step.choose_graph_replay`)."""
    return typer.Option(
        None,
        "--cuda-graph/--eager",
        help="Replay LSA decode steps between boundaries from a captured CUDA graph, or never. Unset: whenever the "
        "model and device allow.",
        show_default=False,
    )
