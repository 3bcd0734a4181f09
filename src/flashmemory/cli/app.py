"""Typer application: ``flashmemory ask | demo`` here, the other commands registered from their modules."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from ..config import LSAConfig
from .answer_view import AnswerView
from .bench import bench, bench_compare, bench_report
from .errors import friendly_errors
from .graph_option import cuda_graph_option
from .kv_cache import kv_cache
from .pipeline import blend, dump, indexer_eval, train, train_feedback
from .plan import plan
from .serve import serve

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Lookahead Sparse Attention for long contexts.")
OUT = Console()
DEFAULTS = LSAConfig()


def lsa_config(
    budget: float, interval: int, chunk_size: int, page_chunks: int | None, recent: int, sink: int
) -> LSAConfig:
    if not budget > 0:
        raise ValueError(f"--budget must be a fraction in (0, 1] or a byte count > 1, got {budget}")
    return LSAConfig(
        budget=budget,
        interval=interval,
        chunk_size=chunk_size,
        page_chunks=page_chunks,
        recent=recent,
        sink=sink,
    )


@app.command()
@friendly_errors
def ask(
    question: list[str] = typer.Option(
        None,
        "--question",
        "-q",
        help="Question about the context; repeat it to ask several over one prefill. None: read them from standard "
        "input, one a line (typed at a prompt, or piped), each answered as it comes.",
        show_default=False,
    ),
    context_file: Path = typer.Option(
        ..., "--context-file", "-c", help="Text file with the long context; - reads it from standard input."
    ),
    model: str = typer.Option("smollm2-135m", "--model", "-m", help="Short name, HF folder or GGUF file."),
    method: str = typer.Option("lsa", help="lsa or full."),
    budget: float | None = typer.Option(
        None,
        help=f"Device KV cap: fraction of the full cache, or bytes. Unset: {DEFAULTS.budget}, and a context too "
        "short for it is answered with full attention; set, LSA holds to it or refuses.",
        show_default=False,
    ),
    max_new_tokens: int = typer.Option(64, help="Most tokens to generate."),
    interval: int = typer.Option(DEFAULTS.interval, help="Decode steps per recall cycle."),
    chunk_size: int = typer.Option(DEFAULTS.chunk_size, help="Tokens per scored chunk."),
    page_chunks: int | None = typer.Option(
        DEFAULTS.page_chunks, help="Chunks per recalled page (unset: the size measured for the model's shape, else 4)."
    ),
    recent: int = typer.Option(DEFAULTS.recent, help="Recent tokens always resident."),
    sink: int = typer.Option(DEFAULTS.sink, help="First tokens always resident."),
    device: str = typer.Option("auto", help="cpu, cuda or auto."),
    indexer: str = typer.Option("auto", help="auto (shipped checkpoint if it matches), zero-shot, or a folder."),
    cuda_graph: bool | None = cuda_graph_option(),
    kv_cache: Path = typer.Option(
        None,
        "--kv-cache",
        help="Folder of saved contexts: read this context's keys and values from it if saved, else save them there.",
    ),
    as_json: bool = typer.Option(False, "--json", help="Print JSON: one object per question, one per line."),
    stream: bool | None = typer.Option(
        None,
        "--stream/--no-stream",
        help="Show each answer as it is decoded. Unset: when the output is a terminal and not --json.",
        show_default=False,
    ),
) -> None:
    """Answer questions about a long text file with LSA (or full attention).

    Several questions share one prefill of the context; each is answered as if it were asked alone.
    """
    from ..runtime.ask import ask_as_they_come, ask_questions

    if not question and str(context_file) == "-":
        raise ValueError("give --question when the context comes on standard input (else questions are read there)")
    cfg = lsa_config(DEFAULTS.budget if budget is None else budget, interval, chunk_size, page_chunks, recent, sink)
    streaming = sys.stdout.isatty() if stream is None else stream
    options = dict(
        method=method,
        lsa=cfg,
        max_new_tokens=max_new_tokens,
        device=device,
        progress=not as_json,
        indexer=indexer,
        cuda_graph=cuda_graph,
        kv_cache=kv_cache,
        budget_given=budget is not None,
    )
    if question:
        view = AnswerView(OUT, question, stream=streaming, as_json=as_json, headers=len(question) > 1)
        shown = view.piece if view.stream else None
        results = ask_questions(model, context_file, question, on_text=shown, on_answer=view.record, **options)
        _note_fallback(method, results)
        view.context_kv(results[0])
        return
    typed = sys.stdin.isatty()
    asked: list[str] = []  # the questions answered, in order (a refused one is taken out again)
    view = AnswerView(OUT, asked, stream=streaming, as_json=as_json, headers=not typed)

    def refused(q: str, message: str) -> None:
        asked.pop()
        print(f"error: {message}", file=sys.stderr, flush=True)

    records = ask_as_they_come(
        model,
        context_file,
        _read_questions(asked, typed),
        on_text=view.piece if view.stream else None,
        on_refused=refused,
        **options,
    )
    noted = False
    for i, record in enumerate(records):
        noted = noted or _note_fallback(method, [record])
        view.record(i, record)
        if i == 0:
            view.context_kv(record)


def _read_questions(asked: list[str], typed: bool) -> Iterator[str]:
    """Questions from standard input, one a line, each added to ``asked`` as it is read; a prompt when typed.
    Ends at the end of the input (Ctrl-D) or Ctrl-C."""
    if typed:
        OUT.print("[dim]the context is ready: type a question and Enter; Ctrl-D ends[/]")
    while True:
        try:
            line = OUT.input("[bold]question>[/] ") if typed else sys.stdin.readline()
        except (EOFError, KeyboardInterrupt):
            return
        if not typed and not line:
            return
        if line.strip():
            asked.append(line.strip())
            yield line.strip()


def _note_fallback(method: str, results: list[dict]) -> bool:
    """Says so when LSA's default budget could not hold the context and full attention answered."""
    if method == "lsa" and any(r["method"] == "full" for r in results):
        print(
            f"note: LSA cannot keep this context within the default budget {DEFAULTS.budget} (the always-resident "
            "sink, tail and chunk keys outgrow a share of so short a cache); answered with full attention. "
            "Give --budget to hold LSA to a budget.",
            file=sys.stderr,
        )
        return True
    return False


@app.command()
@friendly_errors
def demo(
    model: str = typer.Option("smollm2-135m", "--model", "-m", help="Short name, HF folder or GGUF file."),
    context_tokens: int = typer.Option(2048, help="Length of the document."),
    budget: float = typer.Option(DEFAULTS.budget, help="LSA device KV cap (fraction of the full cache)."),
    seed: int = typer.Option(0, help="Which document and fact."),
    device: str = typer.Option("auto", help="cpu, cuda or auto."),
    indexer: str = typer.Option("auto", help="auto (shipped checkpoint if it matches), zero-shot, or a folder."),
) -> None:
    """A long document with a planted fact, answered by full attention and by LSA, side by side."""
    from .demo import run_demo

    cfg = lsa_config(
        budget, DEFAULTS.interval, DEFAULTS.chunk_size, DEFAULTS.page_chunks, DEFAULTS.recent, DEFAULTS.sink
    )
    with OUT.status("loading the model and building the document..."):
        report = run_demo(
            model, context_tokens=context_tokens, lsa=cfg, seed=seed, device=device, indexer=indexer, console=OUT
        )
    table = Table(title=f"{report['question']}  (expected: {report['expected']})")
    for col in ("method", "answer", "correct", "device KV", "of full", "decode s"):
        table.add_column(col)
    for row in report["rows"]:
        table.add_row(
            row["method"],
            row["answer"][:60],
            "yes" if row["correct"] else "no",
            f"{row['kv_bytes_device'] / 2**20:.2f} MiB",
            f"{row['kv_ratio']:.1%}",
            f"{row['decode_seconds']:.2f}",
        )
    OUT.print(table)
    OUT.print(f"[dim]{report['context_tokens']} tokens, fact at {report['depth']:.0%} depth, model {model}[/]")


app.command()(dump)
app.command()(train)
app.command("train-feedback")(train_feedback)
app.command("indexer-eval")(indexer_eval)
app.command()(blend)
app.command()(bench)
app.command("bench-report")(bench_report)
app.command("bench-compare")(bench_compare)
app.command()(serve)
app.command()(plan)
app.command("kv-cache")(kv_cache)


def main() -> None:
    app()
