"""``flashmemory bench TASKSET``: compare methods on a long-context task set (register with ``app.command()``)."""

from __future__ import annotations

import shlex
import sys
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from ..config import LSAConfig, parse_int_list, with_overrides
from .errors import friendly_errors

OUT = Console()


def _int_list(text: str, option: str) -> list[int]:
    try:
        return list(parse_int_list(text))
    except ValueError:
        raise ValueError(f"{option} must be comma-separated token counts, got {text!r}") from None


@friendly_errors
def bench(
    taskset: str = typer.Argument(
        ..., help="ruler, longbench-v2 or longmemeval; add :task1,task2 to pick tasks (e.g. longbench-v2:code_repo)."
    ),
    model: str = typer.Option("smollm2-135m", "--model", "-m", help="Short name, HF folder or GGUF file."),
    lengths: str = typer.Option("4096", help="Comma-separated total lengths in tokens (prompt + answer)."),
    methods: str = typer.Option("full,lsa,recent,random", help="Comma-separated methods to compare."),
    samples: int = typer.Option(5, help="Samples per task and length."),
    budget: float = typer.Option(LSAConfig().budget, help="LSA device KV cap: fraction of the full cache, or bytes."),
    out: Path = typer.Option(Path("bench-out"), "--out", "-o", help="Output folder (resumed if it exists)."),
    seed: int = typer.Option(0, help="Seed of the samples and of the random baseline."),
    device: str = typer.Option("auto", help="cpu, cuda or auto."),
    data: Path | None = typer.Option(
        None, help="Published data instead of the local tasks: LongBench-v2's data.json or a LongMemEval file."
    ),
    max_minutes: float | None = typer.Option(
        None, help="Stop starting new samples after this many minutes; the summary covers what finished."
    ),
    workers: int = typer.Option(
        1, help="Processes decoding samples side by side, each with its own model copy (spread over the GPUs)."
    ),
    lsa_set: list[str] = typer.Option(
        [], "--lsa", help="Other LSA setting as KEY=VALUE (e.g. follow_chunks=1, query_window=64); repeatable."
    ),
    protocol: str = typer.Option(
        "single-prefill",
        help="single-prefill, or question-last: the context is prefilled and the question follows as a second "
        "turn through each method's cache (longbench-v2, longmemeval).",
    ),
) -> None:
    """Run every method on every task, length and sample; write results.jsonl, summaries and a plot."""
    from ..bench.runner import run_bench

    summary = run_bench(
        taskset,
        model,
        lengths=_int_list(lengths, "--lengths"),
        methods=[m.strip() for m in methods.split(",") if m.strip()],
        samples=samples,
        out=out,
        budget=budget,
        seed=seed,
        device=device,
        command=shlex.join(["flashmemory", *sys.argv[1:]]),
        data=data,
        max_minutes=max_minutes,
        workers=workers,
        lsa=with_overrides(LSAConfig(), lsa_set),
        protocol=protocol,
    )
    _print_summary(summary, f"{taskset} on {model}", out, "stopped at --max-minutes")


@friendly_errors
def bench_report(
    folder: Path = typer.Argument(..., help="A bench output folder (holds config.json and results.jsonl)."),
) -> None:
    """Rebuild a bench folder's summaries and plots from its results.jsonl, without loading a model."""
    from ..bench.runner import report_folder

    summary = report_folder(folder)
    config = summary["config"]
    _print_summary(summary, f"{config.get('taskset', folder.name)} on {config.get('model', '?')}", folder, "partial")


@friendly_errors
def bench_compare(
    base: Path = typer.Argument(..., help="Bench folder of the setting compared against (e.g. the default)."),
    other: Path = typer.Argument(..., help="Bench folder of the setting tried, same task set, model, seed, budget."),
    method: str = typer.Option("lsa", help="Method whose rows are compared."),
    reference: str = typer.Option(
        "full", help="Comma-separated methods of BASE shown beside them on the same samples ('' for none)."
    ),
    out: Path | None = typer.Option(None, "--out", "-o", help="Also write the tables here (.md, and .json beside)."),
) -> None:
    """Score one method of two bench folders on the samples both finished, per length and per task."""
    import json

    from ..bench.compare import compare_folders, comparison_markdown

    references = [name.strip() for name in reference.split(",") if name.strip()]
    result = compare_folders(base, other, method=method, references=references)
    text = comparison_markdown(result)
    OUT.print(text, markup=False, highlight=False)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text, encoding="utf-8")
        out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")


def _print_summary(summary: dict, title: str, out: Path, partial: str) -> None:
    table = Table(title=title)
    for col in ("method", "length", "score", "device KV / full", "decode s"):
        table.add_column(col)
    for c in summary["overall"]:
        table.add_row(
            c["method"], str(c["length"]), f"{c['score']:.2f}", f"{c['kv_ratio']:.1%}", f"{c['decode_seconds']:.2f}"
        )
    OUT.print(table)
    if not summary["complete"]:
        rows = summary["rows"]
        OUT.print(f"[yellow]{partial}:[/] {rows['finished']} of {rows['planned']} rows; rerun the bench to continue")
    OUT.print(f"[dim]results in {out} (results.jsonl, summary.md, accuracy_vs_kv.png, accuracy_per_task.png)[/]")
