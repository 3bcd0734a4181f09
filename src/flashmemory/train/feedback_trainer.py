"""``flashmemory train-feedback``: give a trained indexer an attention-feedback head, from dumps alone.

The query tower stays as it is; the head learns, per chunk, how to weigh the tower's logit against the attention
consensus the runtime counts (see :mod:`flashmemory.indexer.feedback`). The feedback a step sees depends on which
chunks were resident, which depends on the scores at the boundary before: training therefore runs in rounds, the
first with residency chosen by the plain counts, each later one replaying the dumps with the previous round's head.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from ..dump.shards import read_manifest
from ..indexer.checkpoint import check_checkpoint_out, load_indexer, save_indexer
from ..indexer.feedback import FeedbackHead, FeedbackSpec
from ..indexer.memory_indexer import MemoryIndexer
from .dataset import PromptExamples, check_compatible, load_examples
from .feedback_sim import Chooser, counts_chooser, head_chooser, replay_features
from .metrics import RecallCurve
from .scorers import indexer_logits


@dataclass(slots=True)
class FeedbackTrainConfig:
    """Settings of :func:`train_feedback`.

    Args:
        interval: decode steps per cycle (boundaries of the replay). Default: 64.
        recent: always-resident newest tokens. Default: 64.
        query_window: newest tokens of the tower's lookahead query. Default: 16.
        kept: share of candidates resident in the replay. Default: 0.15.
        hidden: width of the head. Default: 32.
        tower_slots: share of page slots the runtime gives to the tower's best chunks, stored with the head.
            Default: 0.5.
        rounds: replays; round ``r > 0`` lets round ``r - 1``'s head choose the resident sets. Default: 2.
        iterations: full-batch optimiser steps per round. Default: 400.
        lr: AdamW learning rate. Default: 0.01.
        steps_per_prompt: training steps sampled per prompt (all validation steps are scored). Default: 48.
        seed: sampling seed. Default: 0.
        device: where the head trains. Default: "cpu".
    """

    interval: int = 64
    recent: int = 64
    query_window: int = 16
    kept: float = 0.15
    hidden: int = 32
    tower_slots: float = 0.5
    rounds: int = 2
    iterations: int = 400
    lr: float = 0.01
    steps_per_prompt: int = 48
    seed: int = 0
    device: str = "cpu"

    def __post_init__(self) -> None:
        if not 0.0 < self.kept < 1.0:
            raise ValueError(f"kept must be in (0, 1), got {self.kept}")
        if self.rounds < 1 or self.iterations < 1 or self.steps_per_prompt < 1:
            raise ValueError("rounds, iterations and steps_per_prompt must be >= 1")
        for name in ("lr", "interval", "query_window", "hidden"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.recent < 0:
            raise ValueError(f"recent must be >= 0, got {self.recent}")
        if not 0.0 <= self.tower_slots <= 1.0:
            raise ValueError(f"tower_slots must be in [0, 1], got {self.tower_slots}")


def tower_logits(indexer: MemoryIndexer, ex: PromptExamples, window: int) -> torch.Tensor:
    """The tower's logit at every step of a prompt, combined over target layers by max. # [S, N]"""
    with torch.no_grad():
        return indexer_logits(indexer, ex, torch.arange(ex.num_steps), window=window).cpu()


def _rows(
    prompts: list[PromptExamples],
    logits: list[torch.Tensor],
    spec: FeedbackSpec,
    cfg: FeedbackTrainConfig,
    choose: Chooser,
    sample: torch.Generator | None,
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(candidate features ``[n, F]``, targets ``[n]``) per step: sampled steps with ``sample``, else all."""
    out = []
    for ex, z in zip(prompts, logits, strict=True):
        feats = replay_features(ex, spec, z, interval=cfg.interval, choose=choose)
        steps = torch.arange(ex.num_steps)
        if sample is not None and ex.num_steps > cfg.steps_per_prompt:
            steps = steps[torch.randperm(ex.num_steps, generator=sample)[: cfg.steps_per_prompt]]
        for t in steps.tolist():
            c = ex.candidates[t]
            if c.any():
                out.append((feats[t, c], ex.targets[t, c]))
    return out


def _recall(head: FeedbackHead, rows: list[tuple[torch.Tensor, torch.Tensor]], kept: float, device) -> float:
    curve = RecallCurve(fractions=(kept,))
    with torch.no_grad():
        for x, y in rows:
            curve.add(head(x.to(device)).cpu(), y, None)
    return curve.recall()[0]


def train_feedback(
    dump_dirs: Sequence[str | Path],
    indexer_ckpt: str | Path,
    out: str | Path,
    cfg: FeedbackTrainConfig | None = None,
    *,
    progress: bool = True,
    overwrite: bool = False,
) -> dict:
    """Train a feedback head for the indexer at ``indexer_ckpt`` on the dumps and write the result to ``out``.

    ``out`` holding a checkpoint already (``indexer_ckpt`` itself, say) is refused before training unless
    ``overwrite``.

    The dumps' label settings (top-p, agreement) and prompt window become the head's, so the runtime counts the
    consensus the way the labels were made. The head of the round and iteration with the best validation recall
    at ``kept`` is saved.

    Returns:
        The training record (also stored in the checkpoint's config).
    """
    cfg = cfg or FeedbackTrainConfig()
    check_checkpoint_out(out, overwrite=overwrite)
    dirs = [Path(d) for d in dump_dirs]
    manifest = check_compatible(dirs)
    indexer = load_indexer(indexer_ckpt, fingerprint=manifest["fingerprint"], device=cfg.device)
    if tuple(indexer.target_layers) != tuple(manifest["target_layers"]):
        raise ValueError(
            f"indexer {indexer_ckpt} reads layers {indexer.target_layers}, the dumps recorded "
            f"{manifest['target_layers']}"
        )
    labels = manifest["labels"]
    spec = FeedbackSpec(
        window=int(manifest.get("feedback_window", cfg.interval)),
        top_p=labels["top_p"],
        min_layers=labels["min_layers"],
        hidden=cfg.hidden,
        kept=cfg.kept,
        tower_slots=cfg.tower_slots,
    )
    kw = {"interval": cfg.interval, "recent": cfg.recent}
    train = load_examples(dirs, split="train", **kw)
    val = load_examples(dirs, split="validation", **kw)
    missing = [d for d in dirs if "feedback_window" not in read_manifest(d)]
    device = torch.device(cfg.device)
    torch.manual_seed(cfg.seed)
    head = FeedbackHead(spec).to(device)
    gen = torch.Generator().manual_seed(cfg.seed)
    t0 = time.perf_counter()
    train_z = [tower_logits(indexer, ex, cfg.query_window) for ex in train]
    val_z = [tower_logits(indexer, ex, cfg.query_window) for ex in val]
    best = {"recall": -1.0}
    best_state = None
    history: list[dict] = []
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, disable=not progress) as bar:
        for rnd in range(cfg.rounds):
            choose = counts_chooser if rnd == 0 else head_chooser(head)
            train_rows = _rows(train, train_z, spec, cfg, choose, gen)
            val_rows = _rows(val, val_z, spec, cfg, choose, None)
            x = torch.cat([r[0] for r in train_rows]).to(device)
            y = torch.cat([r[1] for r in train_rows]).float().to(device)
            pos = float(y.sum())
            pos_weight = torch.tensor((y.numel() - pos) / max(pos, 1.0), device=device)
            opt = torch.optim.AdamW(head.parameters(), lr=cfg.lr, weight_decay=1e-4)
            task = bar.add_task(f"feedback head, round {rnd + 1}/{cfg.rounds}", total=cfg.iterations)
            for it in range(cfg.iterations):
                loss = torch.nn.functional.binary_cross_entropy_with_logits(head(x), y, pos_weight=pos_weight)
                opt.zero_grad()
                loss.backward()
                opt.step()
                if (it + 1) % 20 == 0 or it + 1 == cfg.iterations:
                    recall = _recall(head, val_rows, cfg.kept, device)
                    history.append({"round": rnd, "iteration": it + 1, "loss": float(loss), "recall": recall})
                    if recall > best["recall"]:
                        best = {"round": rnd, "iteration": it + 1, "loss": float(loss), "recall": recall}
                        best_state = {k: v.detach().clone() for k, v in head.state_dict().items()}
                bar.advance(task)
            head.load_state_dict(best_state)
    indexer.add_feedback(spec)
    indexer.feedback.load_state_dict(best_state)
    record = {
        "dumps": [str(d) for d in dirs],
        "indexer": str(indexer_ckpt),
        "train_prompts": len(train),
        "validation_prompts": len(val),
        "without_prompt_window": [str(d) for d in missing],
        "config": asdict(cfg),
        "best": {**best, f"recall@{cfg.kept:g}": best["recall"]},
        "seconds": time.perf_counter() - t0,
    }
    out = Path(out)
    meta_path = Path(indexer_ckpt) / "config.json"
    extra = {k: v for k, v in json.loads(meta_path.read_text()).items() if k not in ("format", "spec")}
    extra["feedback_training"] = record
    save_indexer(indexer.cpu(), out, extra=extra)
    (out / "feedback_history.json").write_text(json.dumps(history, indent=1))
    return record
