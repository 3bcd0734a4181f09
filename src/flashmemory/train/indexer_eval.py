"""``flashmemory indexer-eval``: recall of golden chunks vs fraction kept, for the indexer and baselines."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from ..indexer.checkpoint import load_indexer
from .dataset import check_compatible, load_examples
from .feedback_sim import counts_chooser, head_chooser, replay_features
from .metrics import DEFAULT_FRACTIONS, RecallCurve
from .scorers import indexer_logits, page_bound_scores, random_scores, recent_scores

METHODS = ("trained", "zero-shot", "quest", "recent", "random", "oracle")
# with dumps made with --token-keys: the two indexers again, rating a chunk by its best token
TOKEN_METHODS = {"trained": "trained, token keys", "zero-shot": "zero-shot, token keys"}
# with an indexer that has an attention-feedback head: "trained" is the head over the replayed feedback (see
# feedback_sim), and these two show its parts: the tower alone, and the plain feedback counts
FEEDBACK_METHODS = ("trained, as the runtime chooses", "trained, tower alone", "attention feedback, untrained")
INDEXER_METHODS = ("trained", "zero-shot", "trained, tower alone", *TOKEN_METHODS.values())
TOKEN_STEPS = 16  # steps scored at once by token: their per-token scores of a long prompt exist together
# "oracle" ranks by the label itself: the most any scorer could recall at a kept fraction. When a cycle needs
# more chunks than the fraction keeps, even it falls short, so the ceiling says which targets are reachable.


def evaluate_methods(
    dump_dirs: Sequence[str | Path],
    ckpt: str | Path | None,
    *,
    split: str = "validation",
    interval: int = 64,
    recent: int = 64,
    seed: int = 0,
    window: int = 16,
    steps: str = "all",
    target: str = "golden",
    peak_threshold: float = 0.3,
    length_edges: Sequence[int] = (),
    by_kind: bool = False,
    zero_shot_reduce: str | None = None,
) -> dict[str, dict]:
    """Recall curves of every method over the held-out prompts of ``dump_dirs``: over ``"all"`` their steps, or
    over the ``"boundary"`` steps only (every ``interval``-th, where the runtime asks the indexer). ``target``
    and ``peak_threshold`` choose which label counts as needed (see :func:`~.dataset.step_targets`).
    ``length_edges`` (prompt tokens, increasing) also splits the prompts into length ranges, each with its own
    curves under ``"by_length"``: how much of the label a kept fraction can hold depends on the length.
    ``by_kind`` does the same per prompt kind (keyed facts, copy-back...), under ``"by_kind"``.
    ``zero_shot_reduce`` combines the zero-shot indexer's layers (None: as its dump recorded; a dump made before
    dumps recorded it takes ``"max"``, while the runtime averages the default layers: name ``"mean"`` to score
    it as the runtime does)."""
    if steps not in ("all", "boundary"):
        raise ValueError(f"steps must be 'all' or 'boundary', got {steps!r}")
    edges = [int(e) for e in length_edges]
    if any(e <= 0 for e in edges) or edges != sorted(set(edges)):
        raise ValueError(f"length edges must be increasing positive token counts, got {list(length_edges)}")
    stride = interval if steps == "boundary" else 1
    dump_dirs = [Path(d) for d in dump_dirs]
    manifest = check_compatible(dump_dirs)
    prompts = load_examples(
        dump_dirs, split=split, interval=interval, recent=recent, target=target, peak_threshold=peak_threshold
    )
    zero = load_indexer(dump_dirs[0] / "init_indexer", fingerprint=manifest["fingerprint"])
    if zero_shot_reduce is not None:
        zero.spec.layer_reduce = zero_shot_reduce
    trained = load_indexer(ckpt, fingerprint=manifest["fingerprint"]) if ckpt is not None else None
    gen = torch.Generator().manual_seed(seed)
    curves = {m: RecallCurve() for m in METHODS if m != "trained" or trained is not None}
    by_token = all(p.token_keys is not None for p in prompts)
    if by_token:
        curves |= {TOKEN_METHODS[m]: RecallCurve() for m in list(curves) if m in TOKEN_METHODS}
    feedback = trained is not None and trained.feedback is not None
    if feedback:
        curves |= {m: RecallCurve() for m in FEEDBACK_METHODS}
    bins = [_Group({m: RecallCurve() for m in curves}, lo, hi) for lo, hi in _ranges(edges)] if edges else []
    kinds: dict[str, _Group] = {}
    with torch.no_grad():
        for ex in prompts:
            chosen = torch.arange(0, ex.num_steps, stride)
            length = int(ex.positions[0])
            groups = [b for b in bins if b.lo <= length < b.hi]
            if by_kind:
                groups.append(kinds.setdefault(ex.kind, _Group({m: RecallCurve() for m in curves})))
            for group in groups:
                group.prompts += 1
                group.steps += len(chosen)
            scores = {
                "zero-shot": torch.sigmoid(indexer_logits(zero, ex, chosen, window=window)).cpu(),
                "quest": page_bound_scores(zero, ex, chosen),
                "recent": recent_scores(ex, chosen),
                "random": random_scores(ex, chosen, gen),
                "oracle": ex.targets[chosen].float(),
            }
            if trained is not None and not feedback:
                scores["trained"] = torch.sigmoid(indexer_logits(trained, ex, chosen, window=window)).cpu()
            if feedback:
                scores |= _feedback_scores(trained, ex, chosen, window, interval)
            if by_token:
                for name, indexer in (("zero-shot", zero), ("trained", trained)):
                    if indexer is not None:
                        parts = [
                            indexer_logits(indexer, ex, part, window=window, token_keys=True)
                            for part in chosen.split(TOKEN_STEPS)
                        ]
                        scores[TOKEN_METHODS[name]] = torch.sigmoid(torch.cat(parts)).cpu()
            for method, s in scores.items():
                thr = 0.5 if method in INDEXER_METHODS else None
                for r, step in enumerate(chosen.tolist()):
                    c = ex.candidates[step]
                    curves[method].add(s[r, c], ex.targets[step, c], thr)
                    for group in groups:
                        group.curves[method].add(s[r, c], ex.targets[step, c], thr)
    report = {
        "split": split,
        "prompts": len(prompts),
        "steps": sum(len(range(0, p.num_steps, stride)) for p in prompts),
        "step_kind": steps,
        "fractions": list(DEFAULT_FRACTIONS),
        "window": window,
        "layer_reduce": {"zero-shot": zero.spec.layer_reduce}
        | ({"trained": trained.spec.layer_reduce} if trained is not None else {}),
        "target": target if target == "golden" else f"{target}>={peak_threshold}",
        "needed_share": curves["oracle"].positives / max(curves["oracle"].candidates, 1.0),
        "methods": {m: {"recall": c.recall(), **c.summary()} for m, c in curves.items()},
    }
    if bins:
        report["by_length"] = [b.report() | b.length_range() for b in bins]
    if by_kind:
        report["by_kind"] = {kind: kinds[kind].report() for kind in sorted(kinds)}
    return report


@dataclass(slots=True)
class _Group:
    """Curves of some of the prompts: those whose length (tokens before the first decode step) is in
    ``[lo, hi)``, or those of one kind."""

    curves: dict[str, RecallCurve]
    lo: int = 0
    hi: int = 0
    prompts: int = 0
    steps: int = 0

    def length_range(self) -> dict:
        return {"min_tokens": self.lo, "max_tokens": self.hi if self.hi < _NO_LIMIT else None}

    def report(self) -> dict:
        oracle = self.curves["oracle"]
        return {
            "prompts": self.prompts,
            "steps": self.steps,
            "needed_share": oracle.positives / max(oracle.candidates, 1.0),
            "recall": {m: c.recall() for m, c in self.curves.items()},
        }


_NO_LIMIT = 1 << 40


def _ranges(edges: list[int]) -> list[tuple[int, int]]:
    """``[0, e0), [e0, e1), ..., [e_last, no limit)``."""
    bounds = [0, *edges, _NO_LIMIT]
    return list(zip(bounds[:-1], bounds[1:], strict=True))


def _feedback_scores(indexer, ex, chosen: torch.Tensor, window: int, interval: int) -> dict[str, torch.Tensor]:
    """Scores of an indexer with a feedback head, replayed with its own resident sets, and of its parts."""
    spec = indexer.feedback_spec
    z = indexer_logits(indexer, ex, torch.arange(ex.num_steps), window=window).cpu()
    head = indexer.feedback
    own = replay_features(ex, spec, z, interval=interval, choose=head_chooser(head))
    counts = replay_features(ex, spec, z, interval=interval, choose=counts_chooser)
    p = next(head.parameters())
    trained = torch.sigmoid(head(own[chosen].to(p.device)).float()).cpu()
    tower = torch.sigmoid(z[chosen])
    return {
        "trained": trained,
        "trained, as the runtime chooses": torch.stack(
            [
                # a turn's first boundary by the tower alone, later ones tower_slots of the picks to the tower
                tower[r] if int(step) == 0 else alternate(tower[r], trained[r], ex.candidates[step], spec.tower_slots)
                for r, step in enumerate(chosen)
            ]
        ),
        "trained, tower alone": tower,
        "attention feedback, untrained": counts_chooser(counts[chosen]),
    }


def alternate(first: torch.Tensor, second: torch.Tensor, candidates: torch.Tensor, share: float = 0.5) -> torch.Tensor:
    """Scores whose order over the candidates merges the orders of ``first`` and ``second``, skipping chunks already
    taken, so that at any kept fraction ``share`` of the picks come from ``first`` (0.5: they take turns). # [N]"""
    idx = candidates.nonzero().flatten()
    orders = [idx[torch.argsort(x[idx], descending=True)].tolist() for x in (first, second)]
    taken: set[int] = set()
    merged: list[int] = []
    heads, picked = [0, 0], [0, 0]
    while len(merged) < len(idx):
        want = 0 if picked[0] < share * (len(merged) + 1) else 1
        for o in (want, 1 - want):
            order = orders[o]
            while heads[o] < len(order) and order[heads[o]] in taken:
                heads[o] += 1
            if heads[o] < len(order):
                taken.add(order[heads[o]])
                merged.append(order[heads[o]])
                picked[o] += 1
                break
    out = torch.zeros_like(first, dtype=torch.float32)
    if merged:
        out[torch.tensor(merged, dtype=torch.long)] = torch.linspace(1.0, 0.0, len(merged) + 1)[:-1]
    return out


def markdown_table(report: dict) -> str:
    fracs = report["fractions"]
    head = "| method | " + " | ".join(f"recall@{f:.0%}" for f in fracs) + " | kept@0.5 | recall@0.5 | F1@0.5 |"
    rows = [head, "|" + "---|" * (len(fracs) + 4)]
    if "needed_share" in report:
        share = report["needed_share"]
        rows.insert(0, f"Needed chunks are {share:.1%} of the candidates (all queries that need any, pooled).\n")
    for method, m in report["methods"].items():
        cells = " | ".join(f"{r:.3f}" for r in m["recall"])
        thr = (
            f"{m['fraction_kept']:.3f} | {m['recall_at_kept']:.3f} | {m['f1_at_threshold']:.3f}"
            if method in INDEXER_METHODS
            else "– | – | –"
        )
        rows.append(f"| {method} | {cells} | {thr} |")
    if report.get("by_length"):
        bins = [b for b in report["by_length"] if b["prompts"]]
        rows += ["", _group_table(report, "prompt length", {_length_name(b): b for b in bins})]
    if report.get("by_kind"):
        rows += ["", _group_table(report, "prompt kind", report["by_kind"])]
    return "\n".join(rows)


def _length_name(b: dict) -> str:
    hi = b["max_tokens"]
    return f"{b['min_tokens']}+ tokens" if hi is None else f"{b['min_tokens']}-{hi - 1} tokens"


def _group_table(report: dict, by: str, groups: dict[str, dict], fraction: float = 0.15) -> str:
    """Recall at one kept fraction per group of prompts (a column each)."""
    i = report["fractions"].index(fraction)
    bins = list(groups.values())
    rows = [
        f"Recall at {fraction:.0%} kept by {by}:\n",
        "| method | " + " | ".join(groups) + " |",
        "|" + "---|" * (len(bins) + 1),
        "| prompts, steps | " + " | ".join(f"{b['prompts']}, {b['steps']}" for b in bins) + " |",
        "| needed share | " + " | ".join(f"{b['needed_share']:.1%}" for b in bins) + " |",
    ]
    for method in report["methods"]:
        rows.append(f"| {method} | " + " | ".join(f"{b['recall'][method][i]:.3f}" for b in bins) + " |")
    return "\n".join(rows)


def plot_curves(report: dict, path: Path, title: str = "") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4.5))
    for method, m in report["methods"].items():
        style = {"linestyle": "--", "color": "0.4"} if method == "oracle" else {}
        label = "oracle (the label itself: ceiling)" if method == "oracle" else method
        ax.plot(report["fractions"], m["recall"], marker="o", label=label, **style)
    ax.set_xlabel("fraction of candidate chunks kept")
    target = report.get("target", "golden")
    needed = "golden chunks" if target == "golden" else f"chunks a head attends to ({target})"
    ax.set_ylabel(f"recall of {needed}, next cycle")
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title(title or f"{report['prompts']} held-out prompts, {report['steps']} queries")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_report(report: dict, out: Path, title: str = "") -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "indexer_eval.json").write_text(json.dumps(report, indent=1))
    (out / "indexer_eval.md").write_text(markdown_table(report) + "\n")
    plot_curves(report, out / "indexer_eval.png", title)
