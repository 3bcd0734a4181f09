"""``flashmemory dump | train | indexer-eval | blend``: the backbone-free indexer pipeline."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console

from ..config import parse_int_list
from ..dump.capture import LabelConfig
from ..train.feedback_trainer import FeedbackTrainConfig
from ..train.trainer import TrainConfig
from .errors import friendly_errors

OUT = Console()
LABELS = LabelConfig()
TRAIN = TrainConfig()
FEEDBACK = FeedbackTrainConfig()


TARGET_HELP = (
    "Label to learn: 'golden' (top-p head-mean mass), 'peak' (a single head's mass) or 'target-peak' (a single head "
    "of the target layers)."
)


@friendly_errors
def dump(
    model: str = typer.Option("smollm2-135m", "--model", "-m", help="Short name, HF folder or GGUF file."),
    data: str = typer.Option(
        "n=64,val=8,min=2048,max=6144,seed=0",
        help="JSONL file of prompts, or generator settings key=value,...",
    ),
    out: Path = typer.Option(..., "--out", "-o", help="Dump folder (resumed if it holds the same dump)."),
    max_new_tokens: int = typer.Option(96, help="Decode steps recorded per prompt."),
    chunk_size: int = typer.Option(LABELS.chunk_size, help="Tokens per chunk."),
    top_p: float = typer.Option(LABELS.top_p, help="Attention mass of each layer's top-p chunk set."),
    min_layers: int = typer.Option(LABELS.min_layers, help="Layers that must agree for a golden chunk."),
    sink: int = typer.Option(LABELS.sink, help="Always-resident leading tokens, left out of the top-p cut."),
    recent: int = typer.Option(LABELS.recent, help="Always-resident newest tokens, left out of the top-p cut."),
    shard_size: int = typer.Option(8, help="Prompts per shard file."),
    target_layers: str = typer.Option(
        "", help="Comma-separated layers whose hidden states and chunk keys are recorded (default: the model's)."
    ),
    device: str = typer.Option("auto", help="cpu, cuda or auto."),
    token_keys: bool = typer.Option(
        False, "--token-keys", help="Also record every key of the target layers (indexer-eval then scores by token)."
    ),
    feedback_window: int | None = typer.Option(
        None,
        help="Prompt tokens (the last included) whose attention is labelled too: the indexer's feedback input at "
        "the first boundary. Default 64 (0 for DeepSeek-V4, whose capture has no such labels); 0 records none.",
    ),
) -> None:
    """Run the backbone with full attention over training prompts and record indexer training data."""

    from ..dump.runner import run_dump
    from ..dump.spec import build_prompts
    from ..models import model_fingerprint
    from ..runtime.ask import load_on

    if max_new_tokens < 2:
        raise ValueError("--max-new-tokens must be >= 2 (targets look ahead over later steps)")
    labels = LabelConfig(chunk_size=chunk_size, top_p=top_p, min_layers=min_layers, sink=sink, recent=recent)
    try:
        targets = parse_int_list(target_layers) or None
    except ValueError:
        raise ValueError(
            f"--target-layers must be comma-separated layer numbers, e.g. 13 or 12,16; got {target_layers!r}"
        ) from None
    backbone, tokenizer = load_on(model, device)
    prompts = build_prompts(data, tokenizer)
    OUT.print(f"dumping {len(prompts)} prompts with {model} on {backbone.device} into {out}")
    manifest = run_dump(
        backbone,
        tokenizer,
        prompts,
        out,
        backbone=model,
        fingerprint=model_fingerprint(backbone),
        labels=labels,
        target_layers=targets,
        max_new_tokens=max_new_tokens,
        shard_size=shard_size,
        token_keys=token_keys,
        feedback_window=feedback_window,
    )
    steps = sum(m["num_steps"] for m in manifest["prompts"])
    OUT.print(f"[green]done:[/] {len(manifest['prompts'])} prompts, {steps} decode steps in {out}")


@friendly_errors
def train(
    dumps: list[Path] = typer.Option(..., "--dumps", "-d", help="Dump folders (repeat the option for several)."),
    out: Path = typer.Option(..., "--out", "-o", help="Checkpoint folder to write."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace a checkpoint already in --out."),
    epochs: int = typer.Option(TRAIN.epochs, help="Most passes over the training prompts."),
    lr: float = typer.Option(TRAIN.lr, help="Learning rate of the query projections."),
    head_lr: float = typer.Option(TRAIN.head_lr, help="Learning rate of head weights, score bias, distance prior."),
    patience: int = typer.Option(TRAIN.patience, help="Epochs without validation gain before stopping."),
    steps_per_prompt: int = typer.Option(TRAIN.steps_per_prompt, help="Decode steps sampled per prompt per batch."),
    window: int = typer.Option(TRAIN.window, help="Newest steps forming each lookahead query."),
    frequent_weight: float = typer.Option(
        TRAIN.frequent_weight, help="Loss weight of chunks positive in >80% of steps."
    ),
    loss: str = typer.Option(TRAIN.loss, help="focal or bce (per chunk), or listwise (order of the top)."),
    boundary_weight: float = typer.Option(
        TRAIN.boundary_weight, help="Loss weight of the steps where the runtime asks the indexer."
    ),
    select_on: str = typer.Option(TRAIN.select_on, help="Best epoch by recall over 'all' or 'boundary' steps."),
    target: str = typer.Option(TRAIN.target, help=TARGET_HELP),
    peak_threshold: float = typer.Option(TRAIN.peak_threshold, help="Single-head mass that makes a chunk needed."),
    interval: int = typer.Option(TRAIN.interval, help="Lookahead horizon in decode steps."),
    recent: int = typer.Option(TRAIN.recent, help="Always-resident tail tokens."),
    seed: int = typer.Option(TRAIN.seed, help="Sampling seed."),
    interpolate: float = typer.Option(
        TRAIN.interpolate, help="Save (1-a)*initial + a*trained weights; 1 saves the trained weights."
    ),
    distance_prior: str = typer.Option(
        TRAIN.distance_prior,
        help="Bias by how far back a chunk lies: learn, off, or train-only (learned, then left out of the checkpoint).",
    ),
    max_minutes: float = typer.Option(
        0.0, help="Stop after the epoch in which this many minutes have passed, keeping the best so far (0: no limit)."
    ),
    layer_reduce: str = typer.Option(
        None, help="Combine the layers' scores by max or mean, in training and at run time (default: the dump's)."
    ),
    device: str = typer.Option("cpu", help="cpu or cuda."),
) -> None:
    """Train the Memory Indexer's query tower from dumps only (no backbone is loaded)."""
    from ..train.trainer import leave_distributed, train_indexer

    cfg = TrainConfig(
        epochs=epochs,
        lr=lr,
        head_lr=head_lr,
        patience=patience,
        steps_per_prompt=steps_per_prompt,
        window=window,
        frequent_weight=frequent_weight,
        loss=loss,
        boundary_weight=boundary_weight,
        select_on=select_on,
        target=target,
        peak_threshold=peak_threshold,
        interval=interval,
        recent=recent,
        seed=seed,
        interpolate=interpolate,
        distance_prior=distance_prior,
        max_minutes=max_minutes or None,
        layer_reduce=layer_reduce,
    )
    try:
        history = train_indexer(dumps, out, cfg, device=device, overwrite=overwrite)
    except BaseException:
        leave_distributed(meet=False)
        raise
    leave_distributed()
    best, zero = history.get("interpolated", history["best"]), history["zero_shot"]
    OUT.print(
        f"[green]saved[/] {out} (epoch {history['best_epoch']}): validation recall@15% "
        f"{best['recall@0.15']:.3f} (zero-shot {zero['recall@0.15']:.3f}), kept at 0.5 {best['fraction_kept']:.3f}"
    )


@friendly_errors
def train_feedback(
    dumps: list[Path] = typer.Option(..., "--dumps", "-d", help="Dump folders (repeat the option for several)."),
    indexer: Path = typer.Option(..., "--indexer", "-i", help="Trained indexer checkpoint whose tower is kept."),
    out: Path = typer.Option(..., "--out", "-o", help="Checkpoint folder to write (tower + feedback head)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace a checkpoint already in --out."),
    kept: float = typer.Option(FEEDBACK.kept, help="Share of candidate chunks resident while feedback is replayed."),
    rounds: int = typer.Option(FEEDBACK.rounds, help="Replays; later ones follow the previous round's head."),
    iterations: int = typer.Option(FEEDBACK.iterations, help="Full-batch optimiser steps per round."),
    lr: float = typer.Option(FEEDBACK.lr, help="Learning rate of the head."),
    hidden: int = typer.Option(FEEDBACK.hidden, help="Width of the head."),
    tower_slots: float = typer.Option(
        FEEDBACK.tower_slots,
        help="Share of page slots the runtime gives to the tower's best chunks (stored with the head).",
    ),
    steps_per_prompt: int = typer.Option(FEEDBACK.steps_per_prompt, help="Training steps sampled per prompt."),
    interval: int = typer.Option(FEEDBACK.interval, help="Decode steps per cycle."),
    recent: int = typer.Option(FEEDBACK.recent, help="Always-resident tail tokens."),
    window: int = typer.Option(FEEDBACK.query_window, help="Newest steps forming the tower's lookahead query."),
    seed: int = typer.Option(FEEDBACK.seed, help="Sampling seed."),
    device: str = typer.Option(FEEDBACK.device, help="cpu or cuda."),
) -> None:
    """Add an attention-feedback head to a trained indexer, from dumps only (no backbone is loaded)."""
    from ..train.feedback_trainer import train_feedback as run

    cfg = FeedbackTrainConfig(
        interval=interval,
        recent=recent,
        query_window=window,
        kept=kept,
        hidden=hidden,
        tower_slots=tower_slots,
        rounds=rounds,
        iterations=iterations,
        lr=lr,
        steps_per_prompt=steps_per_prompt,
        seed=seed,
        device=device,
    )
    record = run(dumps, indexer, out, cfg, overwrite=overwrite)
    best = record["best"]
    OUT.print(
        f"[green]saved[/] {out}: validation recall@{kept:g} {best['recall']:.3f} "
        f"(round {best['round'] + 1}, iteration {best['iteration']})"
    )


@friendly_errors
def indexer_eval(
    dumps: list[Path] = typer.Option(..., "--dumps", "-d", help="Dump folders with held-out prompts."),
    ckpt: Path = typer.Option(None, "--ckpt", help="Trained indexer checkpoint folder."),
    out: Path = typer.Option(Path("indexer-eval"), "--out", "-o", help="Where to write the table and plot."),
    split: str = typer.Option("validation", help="validation or train."),
    interval: int = typer.Option(TRAIN.interval, help="Lookahead horizon in decode steps."),
    recent: int = typer.Option(TRAIN.recent, help="Always-resident tail tokens."),
    window: int = typer.Option(TRAIN.window, help="Newest steps forming each lookahead query."),
    steps: str = typer.Option("all", help="Score 'all' decode steps or only the 'boundary' steps."),
    target: str = typer.Option(TRAIN.target, help=TARGET_HELP),
    peak_threshold: float = typer.Option(TRAIN.peak_threshold, help="Single-head mass that makes a chunk needed."),
    by_length: str = typer.Option(
        "", help="Comma-separated prompt lengths in tokens, e.g. 4096,8192: also report each length range apart."
    ),
    by_kind: bool = typer.Option(False, "--by-kind", help="Also report each prompt kind apart."),
    zero_shot_reduce: str = typer.Option(
        None, help="Combine the zero-shot indexer's layers by max or mean (default: as the dump recorded)."
    ),
) -> None:
    """Recall of golden chunks vs fraction kept: trained, zero-shot, Quest-style, recent, random."""
    from ..train.indexer_eval import evaluate_methods, markdown_table, write_report

    try:
        edges = parse_int_list(by_length)
    except ValueError:
        raise ValueError(
            f"--by-length must be comma-separated token counts, e.g. 4096,8192; got {by_length!r}"
        ) from None

    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} exists and is not a folder")
    report = evaluate_methods(
        dumps,
        ckpt,
        split=split,
        interval=interval,
        recent=recent,
        window=window,
        steps=steps,
        target=target,
        peak_threshold=peak_threshold,
        length_edges=edges,
        by_kind=by_kind,
        zero_shot_reduce=zero_shot_reduce,
    )
    write_report(report, out)
    OUT.print(markdown_table(report))
    OUT.print(f"[dim]written to {out}/indexer_eval.{{json,md,png}}[/]")


@friendly_errors
def blend(
    start: Path = typer.Option(..., "--start", help="Checkpoint at weight 0, e.g. a dump's init_indexer."),
    end: Path = typer.Option(..., "--end", help="Checkpoint at weight 1, e.g. a trained indexer."),
    weight: float = typer.Option(..., "--weight", "-w", help="Share of the way from --start to --end, in [0, 1]."),
    out: Path = typer.Option(..., "--out", "-o", help="Checkpoint folder to write."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace a checkpoint already in --out."),
) -> None:
    """Blend two indexer checkpoints in weight space: start + weight * (end - start)."""
    from ..indexer.checkpoint import blend_indexers

    blend_indexers(start, end, weight, out, overwrite=overwrite)
    OUT.print(f"[green]saved[/] {out}: {1 - weight:g} × {start} + {weight:g} × {end}")
