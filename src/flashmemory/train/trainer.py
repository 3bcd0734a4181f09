"""``flashmemory train``: fit the query tower on dumps; the backbone is never loaded."""

from __future__ import annotations

import contextlib
import copy
import json
import os
import random
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from torch import nn

from ..config import LAYER_REDUCTIONS
from ..indexer.checkpoint import blend_states, check_checkpoint_out, load_indexer, save_indexer
from ..indexer.memory_indexer import MemoryIndexer, covered_buckets
from .dataset import TARGETS, PromptExamples, check_compatible, load_examples
from .metrics import RecallCurve
from .scorers import indexer_logits

DISTANCE_PRIORS = ("learn", "off", "train-only")


@dataclass(slots=True)
class TrainConfig:
    """Trainer settings.

    Args:
        epochs: passes over the training prompts at most. Default: 12.
        lr: AdamW learning rate of the query projections. Default: 1e-4.
        head_lr: learning rate of the biases (head weights, score) and of the distance prior. Default: 1e-2.
        weight_decay: AdamW weight decay. Default: 1e-2.
        clip: gradient-norm clip. Default: 1.0.
        steps_per_prompt: decode steps sampled per prompt per batch. Default: 16.
        prompts_per_batch: prompts per optimiser step. Default: 4.
        negatives_per_positive: random negatives sampled per positive. Default: 3.
        hard_negatives_per_positive: highest-scoring negatives added per positive. Default: 1.
        loss: ``"focal"`` or ``"bce"`` per chunk, or ``"listwise"``: cross-entropy between the indexer's softmax
            over a step's candidates and the needed chunks (weighted by their peak mass for peak targets), which
            rewards the order at the top, where the few page slots are filled. Default: "focal".
        gamma: focal-loss exponent. Default: 2.0.
        interval: decode steps per cycle (lookahead horizon). Default: 64.
        recent: always-resident tail tokens (not the indexer's decision). Default: 64.
        sink: always-resident leading tokens (not the indexer's decision either). Default: 16.
        patience: epochs without validation improvement before stopping. Default: 3.
        select_fraction: kept fraction whose recall picks the best epoch. Default: 0.15.
        seed: sampling seed. Default: 0.
        window: newest steps forming each lookahead query, as the runtime's ``query_window``. Default: 16.
        frequent_weight: loss weight of chunks positive in more than 80% of a prompt's steps. Default: 0.2.
        boundary_weight: loss weight of the steps where the runtime actually asks the indexer (every
            ``interval``-th step, starting with the first after prefill, whose window is the prompt's end);
            these steps are always sampled. Default: 1.0.
        select_on: validation metrics that pick the best epoch: ``"all"`` steps or ``"boundary"`` steps only.
            Default: "all".
        target: the label the lookahead targets come from: ``"golden"`` (chunks in the top-p attention mass,
            head mean, of ``min_layers`` layers), ``"peak"`` (chunks some single head attends to with at least
            ``peak_threshold`` of its mass) or ``"target-peak"`` (the same, heads of the target layers only: what
            the layers whose keys the indexer scores read). Default: "golden".
        peak_threshold: single-head mass that makes a chunk needed, for ``target="peak"``. Default: 0.3.
        interpolate: the checkpoint holds ``(1 - a) * initial + a * trained`` weights (weight-space ensembling
            with the zero-shot indexer it started from). The trained weights rank more of the needed chunks, the
            zero-shot ones keep some single-fact retrievals that training trades away; 1 keeps the trained
            weights as they are. Default: 1.0.
        distance_prior: the learned bias by how far back a chunk lies. ``"learn"`` trains it and keeps it.
            ``"off"`` holds it at zero. ``"train-only"`` trains it, but validates and saves the indexer without it:
            during training it takes up the preference for recent chunks that decode-time attention labels carry,
            so the query tower learns what a chunk holds, not where it lies; at run time LSA most needs the far
            chunks that a question or a copy reads. Default: "learn".
        max_minutes: stop after the epoch during which this much wall time has passed, keeping the best epoch so
            far (a time-limited machine then still gets a checkpoint). None: no limit. Default: None.
        layer_reduce: how the target layers' chunk probabilities combine, ``"max"`` or ``"mean"``, in training,
            validation and, recorded in the checkpoint, at run time. None: the initial indexer's (a dump made on
            the backbone's default layers records the reduction its zero-shot scorer runs with). Default: None.
    """

    epochs: int = 12
    lr: float = 1e-4
    head_lr: float = 1e-2
    weight_decay: float = 1e-2
    clip: float = 1.0
    steps_per_prompt: int = 16
    prompts_per_batch: int = 4
    negatives_per_positive: int = 3
    hard_negatives_per_positive: int = 1
    loss: str = "focal"
    gamma: float = 2.0
    interval: int = 64
    recent: int = 64
    sink: int = 16
    patience: int = 3
    select_fraction: float = 0.15
    seed: int = 0
    window: int = 16
    frequent_weight: float = 0.2
    boundary_weight: float = 1.0
    select_on: str = "all"
    target: str = "golden"
    peak_threshold: float = 0.3
    interpolate: float = 1.0
    distance_prior: str = "learn"
    max_minutes: float | None = None
    layer_reduce: str | None = None

    def __post_init__(self) -> None:
        if self.layer_reduce not in (None, *LAYER_REDUCTIONS):
            raise ValueError(f"layer_reduce must be one of {LAYER_REDUCTIONS} or None, got {self.layer_reduce!r}")
        if self.loss not in ("focal", "bce", "listwise"):
            raise ValueError(f"loss must be 'focal', 'bce' or 'listwise', got {self.loss!r}")
        if self.select_on not in ("all", "boundary"):
            raise ValueError(f"select_on must be 'all' or 'boundary', got {self.select_on!r}")
        if self.target not in TARGETS:
            raise ValueError(f"target must be one of {TARGETS}, got {self.target!r}")
        if not 0.0 < self.peak_threshold <= 1.0:
            raise ValueError(f"peak_threshold must be in (0, 1], got {self.peak_threshold}")
        if not 0.0 < self.interpolate <= 1.0:
            raise ValueError(f"interpolate must be in (0, 1], got {self.interpolate}")
        if self.distance_prior not in DISTANCE_PRIORS:
            raise ValueError(f"distance_prior must be one of {DISTANCE_PRIORS}, got {self.distance_prior!r}")
        if self.boundary_weight <= 0:
            raise ValueError(f"boundary_weight must be > 0, got {self.boundary_weight}")
        if self.epochs < 1 or self.steps_per_prompt < 1 or self.prompts_per_batch < 1:
            raise ValueError("epochs, steps_per_prompt and prompts_per_batch must be >= 1")
        for name in ("lr", "head_lr", "clip", "interval", "window"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        for name in (
            "weight_decay",
            "gamma",
            "negatives_per_positive",
            "hard_negatives_per_positive",
            "recent",
            "sink",
            "patience",
            "frequent_weight",
        ):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not 0.0 < self.select_fraction < 1.0:
            raise ValueError(f"select_fraction must be in (0, 1), got {self.select_fraction}")
        if self.max_minutes is not None and self.max_minutes <= 0:
            raise ValueError(f"max_minutes must be > 0 or None, got {self.max_minutes}")


def listwise_loss(logits: torch.Tensor, ex: PromptExamples, steps: torch.Tensor, cfg: TrainConfig):
    """Cross-entropy of each step's softmax over its candidates against the needed chunks' share of the need."""
    cand = ex.candidates[steps]
    # targets hold candidates only (load_examples), so the need is zero outside them
    need = ex.targets[steps].float() if ex.strength is None else ex.strength[steps] * ex.targets[steps]
    mass = need.sum(-1)
    rows = mass > 0
    if not bool(rows.any()):
        return None
    cand = cand[rows]
    # only rows with a need: a row without candidates would be all -inf and poison the gradient with NaN
    logp = torch.log_softmax(logits[rows].masked_fill(~cand, float("-inf")), dim=-1).masked_fill(~cand, 0.0)
    per_step = -(need[rows] / mass[rows, None] * logp).sum(-1)
    w = torch.where(steps[rows] % cfg.interval == 0, cfg.boundary_weight, 1.0)
    return (per_step * w).sum() / w.sum()


def example_loss(logits: torch.Tensor, ex: PromptExamples, steps: torch.Tensor, cfg: TrainConfig, gen: torch.Generator):
    """Per-chunk loss on positives, sampled negatives and mined hard negatives, over candidate chunks only (or
    the listwise loss)."""
    if cfg.loss == "listwise":
        return listwise_loss(logits, ex, steps, cfg)
    targets = ex.targets[steps]
    cand = ex.candidates[steps]
    weights = ex.weights.expand_as(targets).clone()
    weights[steps % cfg.interval == 0] *= cfg.boundary_weight
    pos = targets & cand
    neg = cand & ~targets
    chosen = pos.clone()
    for r in range(len(steps)):
        n_pos = int(pos[r].sum())
        neg_ids = neg[r].nonzero().flatten()
        if n_pos == 0 or neg_ids.numel() == 0:
            continue
        k = min(neg_ids.numel(), cfg.negatives_per_positive * n_pos)
        chosen[r, neg_ids[torch.randperm(neg_ids.numel(), generator=gen)[:k]]] = True
        h = min(neg_ids.numel(), cfg.hard_negatives_per_positive * n_pos)
        hard = logits[r, neg_ids].detach().topk(h).indices
        chosen[r, neg_ids[hard]] = True
    if not bool(chosen.any()):
        return None
    x, y, w = logits[chosen], targets[chosen].float(), weights[chosen]
    bce = F.binary_cross_entropy_with_logits(x, y, reduction="none")
    if cfg.loss == "focal":
        p = torch.sigmoid(x)
        pt = torch.where(y > 0, p, 1 - p)
        bce = bce * (1 - pt).pow(cfg.gamma)
    return (bce * w).sum() / w.sum()


def evaluate(
    indexer: MemoryIndexer,
    prompts: list[PromptExamples],
    threshold: float = 0.5,
    window: int = 1,
    interval: int = 64,
) -> dict:
    """Validation metrics of ``indexer`` over every step of ``prompts``, and (prefixed ``boundary_``) over the
    steps where the runtime asks the indexer."""
    curve, at_boundary = RecallCurve(), RecallCurve()
    losses = []
    with torch.no_grad():
        for ex in prompts:
            steps = torch.arange(ex.num_steps)
            logits = indexer_logits(indexer, ex, steps, window=window).cpu()
            for r in range(len(steps)):
                c = ex.candidates[r]
                scores = torch.sigmoid(logits[r, c])
                curve.add(scores, ex.targets[r, c], threshold)
                if r % interval == 0:
                    at_boundary.add(scores, ex.targets[r, c], threshold)
            c = ex.candidates
            losses.append(F.binary_cross_entropy_with_logits(logits[c], ex.targets[c].float()).item())
    boundary = {f"boundary_{k}": v for k, v in at_boundary.summary().items()}
    return {"loss": sum(losses) / len(losses), **curve.summary(), **boundary}


def _distributed() -> tuple[int, int]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not torch.distributed.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        torch.distributed.init_process_group(backend)
    rank = torch.distributed.get_rank() if world > 1 else 0
    return rank, world


def leave_distributed(*, meet: bool = True) -> None:
    """Leave the process group training joined under ``torchrun`` (nothing when there is none).

    With ``meet`` the ranks first wait for each other: a rank that exits while its peers are still tearing the group
    down can be aborted by Gloo's threads at interpreter exit ("terminate called without an active exception"),
    after its work is done. After a failure a peer may never arrive, so it is left out then.
    """
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return
    if meet:
        torch.distributed.barrier()
    torch.distributed.destroy_process_group()


def _average_gradients(module: torch.nn.Module, world: int) -> None:
    """Mean of the gradients over ranks (a rank without a loss term this step contributes zeros)."""
    for p in module.parameters():
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        torch.distributed.all_reduce(p.grad)
        p.grad /= world


def _out_of_time(start: float, cfg: TrainConfig, world: int) -> bool:
    """Whether the time limit has passed; under several ranks, whether it has for any of them (all stop together)."""
    late = cfg.max_minutes is not None and time.monotonic() - start > 60.0 * cfg.max_minutes
    if world > 1:
        flag = torch.tensor([float(late)])
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        late = bool(flag.item())
    return late


def train_indexer(
    dump_dirs: Sequence[str | Path],
    out: str | Path,
    cfg: TrainConfig | None = None,
    *,
    init: str | Path | None = None,
    device: str | torch.device = "cpu",
    progress: bool = True,
    overwrite: bool = False,
) -> dict:
    """Train a Memory Indexer from dump folders and write the best checkpoint (by validation) to ``out``.

    ``out`` holding a checkpoint already is refused before training unless ``overwrite``.

    Works under ``torchrun`` (``WORLD_SIZE`` > 1): each rank takes every ``world``-th prompt, gradients are
    averaged over ranks after every step, so all ranks hold the same weights; rank 0 writes the checkpoint.

    Returns:
        History: per-epoch training loss and validation metrics, best epoch and its metrics.
    """
    cfg = cfg or TrainConfig()
    out = check_checkpoint_out(out, overwrite=overwrite)
    dump_dirs = [Path(d) for d in dump_dirs]
    manifest = check_compatible(dump_dirs)
    rank, world = _distributed()
    # one definition of the targets, so that validation scores what training learns
    labels = dict(
        interval=cfg.interval, recent=cfg.recent, sink=cfg.sink, target=cfg.target, peak_threshold=cfg.peak_threshold
    )
    loading = time.monotonic()
    train = load_examples(dump_dirs, split="train", frequent_weight=cfg.frequent_weight, **labels)
    val = load_examples(dump_dirs, split="validation", **labels)
    if progress and rank == 0:
        steps = sum(ex.num_steps for ex in train)
        print(
            f"loaded {len(train)} training prompts ({steps} decode steps) and {len(val)} validation prompts "
            f"in {time.monotonic() - loading:.0f} s",
            flush=True,
        )
    indexer = load_indexer(init or dump_dirs[0] / "init_indexer", fingerprint=manifest["fingerprint"]).to(device)
    if cfg.layer_reduce is not None:
        indexer.spec.layer_reduce = cfg.layer_reduce
    # Biases and the distance prior start far from their optimum and are cheap to move; the matrices (query
    # projection, head-weight projection) multiply hidden states of large norm and need the small rate.
    fast = ("head_weight.bias", "score_bias", "distance_bias")
    if cfg.distance_prior == "off":
        with torch.no_grad():
            indexer.distance_bias.zero_()
        indexer.distance_bias.requires_grad_(False)
    elif train:
        # the farthest chunk a training query sees is the first, from the last decode step of the longest prompt
        farthest = max(int(ex.positions.max()) for ex in train) - (indexer.spec.chunk_size - 1)
        indexer.spec.prior_buckets = covered_buckets(farthest, indexer.spec.chunk_size)
    params = [(n, p) for n, p in indexer.named_parameters() if p.requires_grad]
    heads = [p for n, p in params if any(f in n for f in fast)]
    rest = [p for n, p in params if not any(f in n for f in fast)]
    opt = torch.optim.AdamW(
        [{"params": rest, "lr": cfg.lr}, {"params": heads, "lr": cfg.head_lr}], weight_decay=cfg.weight_decay
    )
    gen = torch.Generator().manual_seed(cfg.seed + rank)
    rng = random.Random(cfg.seed)
    initial = copy.deepcopy(indexer.state_dict())
    zero_shot = evaluate(indexer, val, window=cfg.window, interval=cfg.interval)
    history = {"config": asdict(cfg), "epochs": [], "zero_shot": zero_shot}
    best, best_state, stale = -1.0, None, 0
    start = time.monotonic()
    mine = train[rank::world]
    # Every rank takes the same number of optimiser steps, or the gradient all-reduce would wait forever.
    per_rank = -(-len(train) // world)
    num_batches = -(-per_rank // cfg.prompts_per_batch)
    columns = (
        TextColumn("epoch {task.fields[epoch]}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
    )
    with Progress(*columns, disable=not progress or rank != 0) as bar:
        for epoch in range(cfg.epochs):
            order = list(range(len(mine)))
            rng.shuffle(order)
            order = (order * (1 + per_rank // max(1, len(order))))[:per_rank] if order else []
            batches = [order[i * cfg.prompts_per_batch : (i + 1) * cfg.prompts_per_batch] for i in range(num_batches)]
            task = bar.add_task("train", total=len(batches), epoch=epoch + 1)
            losses = []
            indexer.train()
            for batch in batches:
                opt.zero_grad()
                terms = []
                for i in batch:
                    ex = mine[i]
                    steps = torch.randperm(ex.num_steps, generator=gen)[: cfg.steps_per_prompt]
                    steps = torch.unique(torch.cat([torch.arange(0, ex.num_steps, cfg.interval), steps]))
                    logits = indexer_logits(indexer, ex, steps, window=cfg.window).cpu()
                    loss = example_loss(logits, ex, steps, cfg, gen)
                    if loss is not None:
                        terms.append(loss)
                if terms:
                    total = torch.stack(terms).mean()
                    total.backward()
                    losses.append(total.item())
                if world > 1:
                    _average_gradients(indexer, world)
                if terms or world > 1:
                    torch.nn.utils.clip_grad_norm_(indexer.parameters(), cfg.clip)
                    opt.step()
                bar.advance(task)
            with _without_prior(indexer) if cfg.distance_prior == "train-only" else contextlib.nullcontext():
                metrics = evaluate(indexer, val, window=cfg.window, interval=cfg.interval)
            name = ("boundary_" if cfg.select_on == "boundary" else "") + f"recall@{cfg.select_fraction:g}"
            key = metrics[name] if name in metrics else -metrics["loss"]
            history["epochs"].append({"epoch": epoch + 1, "train_loss": sum(losses) / max(1, len(losses)), **metrics})
            if progress and rank == 0:
                bar.console.print(
                    f"epoch {epoch + 1}: train loss {history['epochs'][-1]['train_loss']:.4f}, validation {name} "
                    f"{metrics.get(name, float('nan')):.3f} (zero-shot {zero_shot.get(name, float('nan')):.3f})"
                )
            if key > best:
                best, best_state, stale = key, copy.deepcopy(indexer.state_dict()), 0
                history["best_epoch"] = epoch + 1
                if rank == 0:
                    # a run stopped from outside (a time out, a lost machine) keeps its best epoch so far
                    _save_partial(indexer, best_state, initial, cfg, out, history, dump_dirs)
            else:
                stale += 1
                if stale >= cfg.patience:
                    break
            if _out_of_time(start, cfg, world):
                history["stopped_by_time"] = epoch + 1
                break
    indexer.load_state_dict(_checkpoint_state(best_state, initial, cfg))
    indexer.spec.trained = True
    history["best"] = history["epochs"][history["best_epoch"] - 1]
    saved = {"dumps": [str(d) for d in dump_dirs], "best": history["best"]}
    if cfg.interpolate < 1.0:
        a = cfg.interpolate
        history["interpolated"] = saved["interpolated"] = {
            "interpolate": a,
            **evaluate(indexer, val, window=cfg.window, interval=cfg.interval),
        }
    if rank == 0:
        save_indexer(indexer, out, extra={"training": saved})
        (out / "history.json").write_text(json.dumps(history, indent=1))
        plot_history(history, out / "training_curve.png")
    if world > 1:
        torch.distributed.barrier()  # the other ranks return once the checkpoint exists
    return history


def _checkpoint_state(best: dict, initial: dict, cfg: TrainConfig) -> dict:
    """The weights a checkpoint holds for the best epoch's ``best``: without the distance prior when it was for
    training only, and blended with the ``initial`` weights when ``cfg.interpolate`` < 1."""
    state = dict(best)
    if cfg.distance_prior == "train-only":
        state["distance_bias"] = torch.zeros_like(state["distance_bias"])
    if cfg.interpolate < 1.0:
        state = blend_states(initial, state, cfg.interpolate)
    return state


def _save_partial(
    indexer: MemoryIndexer, best: dict, initial: dict, cfg: TrainConfig, out: Path, history: dict, dumps: list[Path]
) -> None:
    """Write the best epoch so far as the checkpoint, marked partial; the end of training overwrites it."""
    snapshot = copy.deepcopy(indexer)
    snapshot.load_state_dict(_checkpoint_state(best, initial, cfg))
    snapshot.spec.trained = True
    epoch = history["best_epoch"]
    extra = {"training": {"dumps": [str(d) for d in dumps], "best": history["epochs"][epoch - 1], "partial": True}}
    save_indexer(snapshot, out, extra=extra)
    (out / "history.json").write_text(json.dumps(history, indent=1))


@contextlib.contextmanager
def _without_prior(indexer: nn.Module) -> Iterator[None]:
    """Score with the distance prior set to zero, then put the learned one back."""
    kept = indexer.distance_bias.detach().clone()
    with torch.no_grad():
        indexer.distance_bias.zero_()
    try:
        yield
    finally:
        with torch.no_grad():
            indexer.distance_bias.copy_(kept)


def plot_history(history: dict, path: Path) -> None:
    """Training loss and validation recall per epoch."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [e["epoch"] for e in history["epochs"]]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    a.plot(epochs, [e["train_loss"] for e in history["epochs"]], marker="o", label="train")
    a.plot(epochs, [e["loss"] for e in history["epochs"]], marker="o", label="validation (BCE)")
    a.set_xlabel("epoch")
    a.set_ylabel("loss")
    a.legend()
    for key in ("recall@0.05", "recall@0.1", "recall@0.15", "recall@0.2"):
        b.plot(epochs, [e[key] for e in history["epochs"]], marker="o", label=key)
        b.axhline(history["zero_shot"][key], ls=":", color=b.lines[-1].get_color())
    b.set_xlabel("epoch")
    b.set_ylabel("validation recall (dotted: zero-shot)")
    b.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
