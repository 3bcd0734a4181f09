"""``flashmemory bench``: every method on every task, length and sample, resumable, with summaries and a plot.

One JSON line per (task, length, sample, method) goes to ``results.jsonl`` as soon as it is known, so a crashed
or interrupted run picks up where it stopped; ``summary.json``, ``summary.md`` and ``accuracy_vs_kv.png`` are
rebuilt from that file at the end.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import shlex
import sys
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from statistics import mean

import torch
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from ..config import LSAConfig
from ..indexer.shipped import shipped_identity
from ..models.adapter import backbone_spec
from .longbench import LOCAL_TASKS as LONGBENCH_LOCAL_TASKS
from .longbench import LONGBENCH_TASKS, load_longbench
from .longmemeval import LONGMEMEVAL_TASKS, load_longmemeval
from .methods import METHODS, get_method
from .record import git_commit, machine_description
from .row import run_row
from .ruler import RULER_TASKS, generate_ruler
from .sample_source import SampleSource, chat_prompt, encode_sample
from .workers import WorkerPool

_clock = time.monotonic  # the wall clock that --max-minutes reads (tests replace it)

TASKSETS: dict[str, tuple[str, ...]] = {
    "ruler": RULER_TASKS,
    "longbench-v2": LONGBENCH_LOCAL_TASKS,
    "longmemeval": LONGMEMEVAL_TASKS,
}
# Tasks of the tasksets that also read published data (--data): LongBench-v2 has six domains, three built locally.
PUBLISHED_TASKS: dict[str, tuple[str, ...]] = {"longbench-v2": LONGBENCH_TASKS, "longmemeval": LONGMEMEVAL_TASKS}
RESULTS, CONFIG = "results.jsonl", "config.json"
# Settings that change what a row means: a rerun into the same folder must agree on them to reuse rows.
_PINNED = (
    "taskset_family",
    "model",
    "budget",
    "seed",
    "lsa",
    "data",
    "lsa_indexer",
    "lsa_default_scorer",
    "protocol",
    "lsa_tail_room",
)
# The new tokens the recent tail keeps room for: it decides how many pages a budget holds, for LSA and for every
# peer whose budget is matched to LSA's reserve.
TAIL_ROOM = "min(interval, max_new_tokens)"
# What a folder written before a pinned setting was recorded ran with (the default scorer changed: no entry).
_BEFORE_RECORDED = {"protocol": "single-prefill", "lsa_tail_room": "interval"}
# LSA settings added after folders were written, with the value those folders ran with
_LSA_BEFORE_RECORDED = {
    "first_boundary_keys": "chunk",
    "token_keys_from": None,
    "later_boundary_keys": "chunk",
    "warmup_steps": [],
}

Loader = Callable[[str, str], tuple[torch.nn.Module, object]]
PROTOCOLS = ("single-prefill", "question-last")
QUESTION_TURN_FAMILIES = ("longbench-v2", "longmemeval")


def parse_taskset(taskset: str, data: Path | None = None) -> tuple[str, list[str]]:
    """``"ruler"`` -> all RULER tasks; ``"ruler:niah_single_1,vt"`` -> those tasks.

    Args:
        taskset: family name, optionally followed by ``:`` and a comma-separated task list.
        data: published data file of the taskset (``longbench-v2``, ``longmemeval``), or None for local tasks.

    Returns:
        The family and its tasks, in the given order.
    """
    family, _, picked = taskset.partition(":")
    if family not in TASKSETS:
        raise ValueError(f"unknown taskset {family!r}; valid tasksets: {', '.join(TASKSETS)}")
    if data is not None and family not in PUBLISHED_TASKS:
        raise ValueError(f"--data is for the tasksets {', '.join(PUBLISHED_TASKS)}, not {family}")
    valid = TASKSETS[family] if data is None else PUBLISHED_TASKS[family]
    tasks = [t.strip() for t in picked.split(",") if t.strip()] if picked else list(valid)
    unknown = [t for t in tasks if t not in valid]
    if unknown:
        raise ValueError(f"unknown {family} task(s) {', '.join(unknown)}; valid tasks: {', '.join(valid)}")
    if not tasks:
        raise ValueError(f"taskset {taskset!r} names no task; valid tasks: {', '.join(valid)}")
    return family, list(dict.fromkeys(tasks))


def validate_options(lengths: list[int], methods: list[str], samples: int, budget: float) -> None:
    """Refuse bad options before the model is loaded (the length limit is checked once it is)."""
    if not lengths:
        raise ValueError("--lengths needs at least one length")
    if any(n < 1 for n in lengths):
        raise ValueError(f"--lengths must be positive token counts, got {lengths}")
    if not methods:
        raise ValueError(f"--methods needs at least one method; valid methods: {', '.join(METHODS)}")
    for name in methods:
        get_method(name)
    if samples < 1:
        raise ValueError(f"--samples must be >= 1, got {samples}")
    if not budget > 0:
        raise ValueError(f"--budget must be a fraction in (0, 1] or a byte count > 1, got {budget}")


def default_loader(model_name: str, device: str) -> tuple[torch.nn.Module, object]:
    """Load a packaged model, HF folder or GGUF file on ``device`` (bf16 on CUDA, fp32 on CPU)."""
    from ..runtime.ask import load_on

    return load_on(model_name, device)


def _row_key(row: dict) -> tuple:
    return (row["task"], int(row["length"]), int(row["sample"]), row["method"])


def read_rows(path: Path) -> list[dict]:
    if not path.exists():
        return []
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            # A crash mid-write leaves at most one torn last line; that row is simply recomputed.
            continue
    return rows


def repair_rows(path: Path) -> list[dict]:
    """Whole rows of a JSONL results file, rewritten without a torn last line when there is one: rows appended
    after a torn line would be glued onto it, so keep only whole rows before appending more."""
    rows = read_rows(path)
    if path.exists() and len(rows) != len(path.read_text(encoding="utf-8").splitlines()):
        path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return rows


def _recorded(out: Path, key: str):
    """``key`` of the folder's recorded config; None for a new folder."""
    path = out / CONFIG
    return json.loads(path.read_text(encoding="utf-8")).get(key) if path.exists() else None


def _check_resume(out: Path, config: dict) -> None:
    path = out / CONFIG
    if not path.exists():
        return
    old = json.loads(path.read_text(encoding="utf-8"))
    recorded = {**_BEFORE_RECORDED, **old}
    if isinstance(recorded.get("lsa"), dict):
        recorded["lsa"] = {**_LSA_BEFORE_RECORDED, **recorded["lsa"]}
    if isinstance(recorded.get("lsa_default_scorer"), dict):
        # written before the threshold was recorded: by runs that scored chunk or token keys, never "auto"
        recorded["lsa_default_scorer"] = {"token_keys_from": None, **recorded["lsa_default_scorer"]}
    _backbone_counts_unset_before(recorded, config)
    changed = [k for k in _PINNED if k in config and recorded.get(k) != config[k]]  # some are known once loaded
    if changed and (out / RESULTS).exists():
        details = ", ".join(f"{k}: {recorded.get(k)!r} -> {config[k]!r}" for k in changed)
        raise ValueError(f"{out} holds results of another run ({details}); use a new --out folder")


def _backbone_counts_unset_before(recorded: dict, config: dict) -> None:
    """A folder written while ``page_chunks`` defaulted to 4 (or ``follow_chunks`` to 0) recorded that number in its
    settings, and none with its default scorer. Now an unset count takes the backbone's own, pinned with the default
    scorer once the model is loaded: the old folder ran with the count it recorded."""
    for key in ("page_chunks", "follow_chunks"):
        old_lsa, new_lsa = recorded.get("lsa"), config.get("lsa")
        if not (isinstance(old_lsa, dict) and isinstance(old_lsa.get(key), int)):
            continue
        scorer = recorded.get("lsa_default_scorer")
        if isinstance(scorer, dict):
            recorded["lsa_default_scorer"] = {key: old_lsa[key], **scorer}
        if isinstance(new_lsa, dict) and new_lsa.get(key) is None:
            recorded["lsa"] = {**old_lsa, key: None}


@contextmanager
def _progress(enabled: bool, total: int) -> Iterator[Callable[..., None]]:
    if not enabled:
        yield lambda **_: None
        return
    columns = (
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("eta"),
        TimeRemainingColumn(),
    )
    with Progress(*columns, transient=False) as bar:
        job = bar.add_task("bench", total=total)
        yield lambda **kw: bar.update(job, advance=1, **kw)


def run_bench(
    taskset: str,
    model_name: str,
    *,
    lengths: list[int],
    methods: list[str],
    samples: int,
    out: Path,
    budget: float,
    seed: int,
    device: str,
    progress: bool = True,
    load: Loader | None = None,
    lsa: LSAConfig | None = None,
    command: str | None = None,
    data: Path | None = None,
    max_minutes: float | None = None,
    workers: int = 1,
    protocol: str = "single-prefill",
) -> dict:
    """Run ``methods`` on every task × length × sample of ``taskset`` and summarise into ``out``.

    Args:
        taskset: ``"ruler"`` or ``"ruler:task1,task2"``.
        model_name: packaged short name, HF folder or GGUF file (passed to ``load``).
        lengths: total token lengths (prompt plus generation) to generate samples at.
        methods: names from :data:`flashmemory.bench.methods.METHODS`.
        samples: samples per task and length.
        out: output folder; rows already in ``out/results.jsonl`` are not recomputed.
        budget: LSA device KV cap, a fraction of the full cache (<= 1) or bytes.
        seed: seed of the samples and of the ``random`` baseline.
        device: ``cpu``, ``cuda`` or ``auto``.
        progress: show a progress bar.
        load: ``(model_name, device) -> (model, tokenizer)``; default :func:`default_loader`.
        lsa: other LSA settings (its budget is replaced by ``budget``). Default: ``LSAConfig()``.
        command: command line recorded in ``config.json``. Default: ``sys.argv``.
        data: published data of ``longbench-v2`` (``data.json``) or ``longmemeval`` (``longmemeval_s.json`` ...);
            None generates the local tasks.
        max_minutes: wall-clock limit of this call; when it is reached no new sample is started and the summary
            covers what finished (rerun to continue). Samples run index-major (sample 0 of every task first), so
            a time-boxed run covers every task. Default: no limit. Samples already handed to workers finish.
        workers: processes that decode samples side by side, each with its own copy of the model (on several
            GPUs, spread over them); rows are the same as with one. ``load`` must then be picklable.
        protocol: ``"single-prefill"`` (the whole prompt in one prefill) or ``"question-last"`` (the context is
            prefilled, then the question arrives as a second turn fed through each method's cache; the same
            tokens, so full attention answers alike, but what a method kept from the context must serve a question
            it had not seen). ``question-last`` needs a task set whose prompts end with a question turn.

    Returns:
        The summary (also written to ``out/summary.json``).
    """
    started = _clock()
    if max_minutes is not None and max_minutes <= 0:
        raise ValueError(f"--max-minutes must be > 0, got {max_minutes}")
    if workers < 1:
        raise ValueError(f"--workers must be >= 1, got {workers}")
    family, tasks = parse_taskset(taskset, data)
    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown --protocol {protocol!r}; valid: {', '.join(PROTOCOLS)}")
    if protocol == "question-last" and family not in QUESTION_TURN_FAMILIES:
        raise ValueError(
            f"--protocol question-last needs prompts that end with a question turn "
            f"({', '.join(QUESTION_TURN_FAMILIES)}); {family} has none"
        )
    if data is not None:  # a missing or malformed file is refused before the model is loaded
        (load_longbench if family == "longbench-v2" else load_longmemeval)(data)
    lengths = list(dict.fromkeys(int(n) for n in lengths))
    methods = list(dict.fromkeys(methods))
    validate_options(lengths, methods, samples, budget)
    cfg = dataclasses.replace(lsa or LSAConfig(), budget=budget)
    config = {
        "command": command or shlex.join(sys.argv),
        "taskset": taskset,
        "taskset_family": family,
        "tasks": tasks,
        "model": model_name,
        "lengths": lengths,
        "methods": methods,
        # What each method's device KV bytes consist of (a masking method is charged the whole cache).
        "method_notes": {name: get_method(name).kv_note for name in methods},
        "samples": samples,
        "budget": budget,
        "seed": seed,
        "device": device,
        "workers": workers,
        "protocol": protocol,
        "lsa": dataclasses.asdict(cfg),
        "lsa_tail_room": TAIL_ROOM,
        "data": None if data is None else str(Path(data).expanduser().resolve()),
        "commit": git_commit(),
        "machine": machine_description(),
    }
    config["lsa"]["target_layers"] = cfg.target_layers and list(cfg.target_layers)
    config["lsa"]["warmup_steps"] = list(cfg.warmup_steps)
    out = Path(out)
    _check_resume(out, config)
    model, tokenizer = (load or default_loader)(model_name, device)
    limit = getattr(model.config, "max_position_embeddings", None)
    if limit is not None and max(lengths) > limit:
        raise ValueError(f"--lengths {max(lengths)} exceeds the model's context window ({limit} tokens)")
    # `lsa` means the shipped checkpoint when one matches the model: rows of another checkpoint must not mix in.
    # A run without `lsa` decodes no row that depends on it, so it keeps the folder's record (resuming the other
    # methods of a grid must not be refused for an indexer it does not use).
    config["lsa_indexer"] = shipped_identity(model) if "lsa" in methods else _recorded(out, "lsa_indexer")
    # `target_layers: null` means the model's default layers, which a later version may choose differently; the
    # layers decide the zero-shot scores and, through the chunk keys' bytes, every peer's matched budget.
    spec = backbone_spec(model)
    layers, reduce = spec.scorer(cfg.target_layers, cfg.layer_reduce)
    resolved = spec.resolve_counts(cfg)
    # likewise the prompt length from which "auto" scores token keys, when the backbone's own one is used
    config["lsa_default_scorer"] = {
        "target_layers": list(layers),
        "layer_reduce": reduce,
        "token_keys_from": cfg.token_keys_threshold(spec.default_token_keys_from()),
        "page_chunks": resolved.page_chunks,
        "follow_chunks": resolved.follow_chunks,
    }
    _check_resume(out, config)
    out.mkdir(parents=True, exist_ok=True)
    (out / CONFIG).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")

    done = {_row_key(r) for r in repair_rows(out / RESULTS)}
    total = len(tasks) * len(lengths) * samples * len(methods)
    source = SampleSource(family, samples=samples, seed=seed, data=data, protocol=protocol, ruler=generate_ruler)
    absent: set[tuple] = set()
    if workers > 1:
        del model  # each worker loads its own copy; the parent only needs the tokenizer
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        pool = WorkerPool(workers, load=load or default_loader, model_name=model_name, device=device,
                          methods=methods, seed=seed, lsa=cfg, family=family, source=source)  # fmt: skip
    else:
        pool, runners = None, {name: get_method(name, seed=seed) for name in methods}
    with (
        pool or nullcontext(),
        _progress(progress, total) as advance,
        (out / RESULTS).open("a", encoding="utf-8") as sink,
    ):

        def record(row: dict) -> None:
            # config.json names the newest run's commit; a folder filled over several runs keeps each row's own
            row["commit"] = config["commit"]
            sink.write(json.dumps(row) + "\n")
            sink.flush()
            advance(description=f"{row['task']} @ {row['length']} #{row['sample']} {row['method']}")

        for index, task, length in itertools.product(range(samples), tasks, lengths):
            if all((task, length, index, m) in done for m in methods):
                for _ in methods:
                    advance(description=f"{task} @ {length} #{index} (cached)")
                continue
            if max_minutes is not None and _clock() - started > 60 * max_minutes:
                break
            todo = [name for name in methods if (task, length, index, name) not in done]
            for _ in range(len(methods) - len(todo)):
                advance(description=f"{task} @ {length} #{index} (cached)")
            if pool is not None:
                pool.submit(task, length, index, todo, record)
                continue
            got = source.get(task, tokenizer, length, index)
            if got is None:  # published data can hold fewer items
                absent.update((task, length, index, m) for m in methods)
                continue
            sample, enc = got
            for name in todo:
                record(run_row(runners[name], model, tokenizer, enc, sample, cfg, family))
        if pool is not None:
            pool.close(record)
            absent.update((task, length, index, m) for task, length, index in pool.absent for m in methods)
    return _summarize_rows(out, config, tasks, lengths, methods, samples, absent)


def _summarize_rows(
    out: Path, config: dict, tasks: list[str], lengths: list[int], methods: list[str], samples: int, absent: set
) -> dict:
    rows = [r for r in read_rows(out / RESULTS) if _row_key(r)[0] in tasks]
    wanted = {(t, n, i, m) for t in tasks for n in lengths for i in range(samples) for m in methods} - absent
    kept = [r for r in rows if _row_key(r) in wanted]
    finished = len({_row_key(r) for r in kept})
    # A stopped run can leave a sample finished by some methods only; scoring those would compare methods on
    # different samples, so the summary keeps the samples that every method finished.
    methods_of: dict[tuple, set] = defaultdict(set)
    for r in kept:
        methods_of[_row_key(r)[:3]].add(r["method"])
    paired = [r for r in kept if len(methods_of[_row_key(r)[:3]]) == len(methods)]
    summary = summarize(paired, config)
    summary["complete"] = finished == len(wanted)
    summary["rows"] = {"finished": finished, "planned": len(wanted), "compared": len(paired)}
    write_summary(out, summary)
    return summary


def report_folder(out: Path) -> dict:
    """Rebuild the summaries and plots of a bench folder from its ``results.jsonl``, loading no model.

    For a run that was stopped before it could summarise (killed, out of time). Items missing from published data
    are not known here, so such a run reads as incomplete.
    """
    config_path, results_path = out / CONFIG, out / RESULTS
    for path in (config_path, results_path):
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found: is {out} a bench output folder?")
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
        plan = [config[k] for k in ("tasks", "lengths", "methods", "samples")]
    except (json.JSONDecodeError, KeyError) as exc:
        raise ValueError(f"{config_path} is not a bench config ({exc})") from None
    return _summarize_rows(out, config, *plan, absent=set())


def summarize(rows: list[dict], config: dict) -> dict:
    """Per method × length: mean over tasks of the per-task mean score, mean KV ratio and decode time.

    Args:
        rows: result rows of this run.
        config: the resolved run settings (copied into the summary).

    Returns:
        ``{"config", "overall": [...], "per_task": [...]}``.
    """
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in rows:
        groups[(r["method"], int(r["length"]), r["task"])].append(r)
    per_task = [
        {
            "method": m,
            "length": n,
            "task": t,
            "score": mean(r["score"] for r in rs),
            "kv_ratio": mean(r["kv_ratio"] for r in rs),
            "decode_seconds": mean(r["decode_seconds"] for r in rs),
            "samples": len(rs),
        }
        for (m, n, t), rs in groups.items()
    ]
    by_cell: dict[tuple, list[dict]] = defaultdict(list)
    for cell in per_task:
        by_cell[(cell["method"], cell["length"])].append(cell)
    overall = [
        {
            "method": m,
            "length": n,
            "score": mean(c["score"] for c in cells),
            "kv_ratio": mean(c["kv_ratio"] for c in cells),
            "decode_seconds": mean(c["decode_seconds"] for c in cells),
            "tasks": len(cells),
            "rows": sum(c["samples"] for c in cells),
        }
        for (m, n), cells in by_cell.items()
    ]
    order = {m: i for i, m in enumerate(config["methods"])}
    overall.sort(key=lambda c: (c["length"], order.get(c["method"], len(order))))
    per_task.sort(key=lambda c: (c["task"], c["length"], order.get(c["method"], len(order))))
    per_bucket = _bucket_cells(rows)
    per_bucket.sort(key=lambda c: (c["bucket"], c["length"], order.get(c["method"], len(order))))
    return {"config": config, "overall": overall, "per_task": per_task, "per_bucket": per_bucket}


def _bucket_cells(rows: list[dict]) -> list[dict]:
    """Mean score per method x length x bucket label (``difficulty=hard``, ``question_type=multi-session``...).

    Buckets cut across tasks, as LongBench-v2 reports easy/hard and short/medium/long over all its domains; each
    sample counts once.
    """
    groups: dict[tuple, list[float]] = defaultdict(list)
    for r in rows:
        for key, value in (r.get("buckets") or {}).items():
            groups[(r["method"], int(r["length"]), f"{key}={value}")].append(r["score"])
    return [
        {"method": m, "length": n, "bucket": b, "score": mean(scores), "samples": len(scores)}
        for (m, n, b), scores in groups.items()
    ]


def summary_markdown(summary: dict) -> str:
    """The summary as two Markdown tables: method × length, then task × (method @ length)."""
    cfg = summary["config"]
    lines = [
        f"# {cfg['taskset']} on {cfg['model']}",
        "",
        f"budget {cfg['budget']}, {cfg['samples']} samples per task and length, seed {cfg['seed']}, "
        f"commit {cfg['commit']}, {cfg['machine']}",
        "",
        *(
            [
                f"**Partial run:** {summary['rows']['finished']} of {summary['rows']['planned']} (task, length, "
                "sample, method) rows finished; rerun the same command to continue. Methods are compared on the "
                f"{summary['rows'].get('compared', summary['rows']['finished'])} rows whose sample every method "
                "finished.",
                "",
            ]
            if not summary.get("complete", True)
            else []
        ),
        "| method | length | score | device KV / full | decode s | tasks |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for c in summary["overall"]:
        lines.append(
            f"| {c['method']} | {c['length']} | {c['score']:.2f} | {c['kv_ratio']:.1%} | "
            f"{c['decode_seconds']:.2f} | {c['tasks']} |"
        )
    notes = cfg.get("method_notes") or {}
    if notes:
        lines += ["", "Device KV per method:", ""] + [f"- `{m}`: {note}" for m, note in notes.items() if note]
    cols = [(c["method"], c["length"]) for c in summary["overall"]]
    cells = {(c["task"], c["method"], c["length"]): c["score"] for c in summary["per_task"]}
    tasks = list(dict.fromkeys(c["task"] for c in summary["per_task"]))
    lines += ["", "| task | " + " | ".join(f"{m} @ {n}" for m, n in cols) + " |", "|---" + "|---:" * len(cols) + "|"]
    for t in tasks:
        vals = [cells.get((t, m, n)) for m, n in cols]
        lines.append(f"| {t} | " + " | ".join("" if v is None else f"{v:.2f}" for v in vals) + " |")
    buckets = {(c["bucket"], c["method"], c["length"]): c for c in summary.get("per_bucket", [])}
    if buckets:
        head = "| bucket (samples) | " + " | ".join(f"{m} @ {n}" for m, n in cols) + " |"
        lines += ["", head, "|---" + "|---:" * len(cols) + "|"]
        for b in dict.fromkeys(key[0] for key in buckets):
            found = [buckets.get((b, m, n)) for m, n in cols]
            count = max(c["samples"] for c in found if c)
            vals = " | ".join("" if c is None else f"{c['score']:.2f}" for c in found)
            lines.append(f"| {b} ({count}) | {vals} |")
    return "\n".join(lines) + "\n"


MARKERS = "os^Dvx*P"  # one per method in both plots, cycled beyond eight


def plot_accuracy_vs_kv(summary: dict, path: Path) -> None:
    """Scatter of score against device KV fraction: one marker shape per method, one point per length."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    # Figure + the Agg canvas directly: no pyplot, so no global backend state and no display needed.
    fig = Figure(figsize=(7.5, 4.5))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    methods = list(dict.fromkeys(c["method"] for c in summary["overall"]))
    for i, m in enumerate(methods):
        cells = [c for c in summary["overall"] if c["method"] == m]
        marker = MARKERS[i % len(MARKERS)]
        ax.scatter([c["kv_ratio"] for c in cells], [c["score"] for c in cells], marker=marker, label=m)
        for c in cells:
            ax.annotate(
                str(c["length"]), (c["kv_ratio"], c["score"]), fontsize=7, xytext=(3, 3), textcoords="offset points"
            )
    ax.set_xlabel("device KV / full cache")
    ax.set_ylabel("score (%)")
    # Methods that keep the whole cache and only mask attention are charged more than the full cache.
    widest = max((c["kv_ratio"] for c in summary["overall"]), default=1.0)
    ax.set_xlim(0, max(1.05, widest * 1.05))
    ax.axvline(1.0, color="grey", linestyle="--", linewidth=0.8)
    ax.set_ylim(-2, 102)
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8)
    ax.set_title(f"{summary['config']['taskset']} on {summary['config']['model']}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


# full attention is the reference and LSA the subject: keep both visible over the other methods' lines
EMPHASIS = {"full": {"color": "black", "linestyle": "--", "zorder": 4}, "lsa": {"linewidth": 2.2, "zorder": 5}}


def plot_per_task(summary: dict, path: Path) -> None:
    """One panel per task: score against length, one line per method, its mean device KV in the legend.

    The device KV fraction of a method hardly changes between tasks, so per task the length is the axis that
    shows something; the fraction goes into the method's label.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    tasks = list(dict.fromkeys(c["task"] for c in summary["per_task"]))
    methods = list(dict.fromkeys(c["method"] for c in summary["overall"]))
    if not tasks:
        return
    cols = min(4, len(tasks))
    rows = -(-len(tasks) // cols)
    fig = Figure(figsize=(3.2 * cols + 2.2, 2.6 * rows))
    FigureCanvasAgg(fig)
    axes = fig.subplots(rows, cols, squeeze=False, sharey=True)
    kv = {m: mean(c["kv_ratio"] for c in summary["overall"] if c["method"] == m) for m in methods}
    lengths = sorted({c["length"] for c in summary["per_task"]})
    ticks = [f"{n // 1024}K" if n >= 1024 else str(n) for n in lengths]
    by_task: dict[tuple[str, str], list[tuple[int, float]]] = defaultdict(list)
    for c in summary["per_task"]:
        by_task[(c["task"], c["method"])].append((c["length"], c["score"]))
    for ax, task in zip(axes.flat, tasks, strict=False):
        for i, m in enumerate(methods):
            cells = sorted(by_task.get((task, m), []))
            if cells:
                style = {"linewidth": 1, **EMPHASIS.get(m, {})}
                ax.plot([n for n, _ in cells], [v for _, v in cells], marker=MARKERS[i % len(MARKERS)], markersize=3,
                        label=f"{m} ({kv[m]:.0%} KV)", **style)  # fmt: skip
        ax.set_xscale("log", base=2)
        ax.set_xticks(lengths, ticks, fontsize=7)
        ax.minorticks_off()
        ax.set_ylim(-2, 102)
        ax.grid(alpha=0.3)
        ax.set_title(task, fontsize=9)
    for ax in list(axes.flat)[len(tasks) :]:
        ax.set_visible(False)
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="upper left", bbox_to_anchor=(1.0 - 2.1 / fig.get_figwidth(), 0.98), fontsize=7)
    fig.suptitle(f"{summary['config']['taskset']} on {summary['config']['model']}: score by task and length")
    fig.tight_layout(rect=(0, 0, 1.0 - 2.2 / fig.get_figwidth(), 0.96))
    fig.savefig(path, dpi=110)


def write_summary(out: Path, summary: dict) -> None:
    """Write ``summary.json``, ``summary.md``, ``accuracy_vs_kv.png`` and ``accuracy_per_task.png`` into ``out``."""
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    (out / "summary.md").write_text(summary_markdown(summary), encoding="utf-8")
    plot_accuracy_vs_kv(summary, out / "accuracy_vs_kv.png")
    plot_per_task(summary, out / "accuracy_per_task.png")


__all__ = [
    "TASKSETS",
    "chat_prompt",
    "default_loader",
    "encode_sample",
    "parse_taskset",
    "report_folder",
    "run_bench",
    "summarize",
    "write_summary",
]
