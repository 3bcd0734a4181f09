"""Compare one method across two bench folders on the samples both finished (``flashmemory bench-compare``).

Two runs of the same task set, model, budget and seed decode the same samples, so a setting tried in a second folder
(an LSA option, another indexer) can be scored against the first row for row, without rerunning the first. Rows are
paired by (task, length, sample); a pair whose prompts differ in length means the samples are not the same and is
refused rather than compared.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path
from statistics import mean

from .runner import CONFIG, RESULTS, read_rows

__all__ = ["compare_folders", "comparison_markdown"]

# Settings that decide which samples a folder holds; they must agree for its rows to pair with another's.
_SAME_SAMPLES = ("taskset_family", "model", "seed", "budget", "data", "protocol")


def _load(folder: Path) -> tuple[dict, list[dict]]:
    for name in (CONFIG, RESULTS):
        if not (folder / name).is_file():
            raise FileNotFoundError(f"{folder / name} not found: is {folder} a bench output folder?")
    try:
        config = json.loads((folder / CONFIG).read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ValueError(f"{folder / CONFIG} is not a bench config ({exc})") from None
    return config, read_rows(folder / RESULTS)


def _setting_changes(base: dict, other: dict) -> list[str]:
    """What the second run set differently, as ``key: base -> other`` (LSA settings and the indexer)."""
    changes = []
    lsa_a, lsa_b = base.get("lsa") or {}, other.get("lsa") or {}
    for key in sorted(set(lsa_a) | set(lsa_b)):
        if lsa_a.get(key) != lsa_b.get(key):
            changes.append(f"{key}: {lsa_a.get(key)!r} -> {lsa_b.get(key)!r}")
    for key in ("lsa_indexer", "commit"):
        if base.get(key) != other.get(key):
            changes.append(f"{key}: {base.get(key)!r} -> {other.get(key)!r}")
    return changes


def _task_means(rows: list[dict]) -> dict[tuple[int, str], float]:
    groups: dict[tuple[int, str], list[float]] = defaultdict(list)
    for r in rows:
        groups[(int(r["length"]), r["task"])].append(float(r["score"]))
    return {k: mean(v) for k, v in groups.items()}


def compare_folders(
    base: Path, other: Path, method: str = "lsa", references: tuple[str, ...] | list[str] = ("full",)
) -> dict:
    """Score ``method`` of two bench folders on the samples both finished, beside ``references`` of ``base``.

    Args:
        base: the folder of the setting compared against (e.g. the default).
        other: the folder of the setting tried.
        method: the method whose rows are compared (present in both folders).
        references: methods of ``base`` shown beside them on the same samples (e.g. ``"full"``); a sample counts
            only when each of them finished it.

    Returns:
        ``{"method", "references", "changes", "per_length": [...], "per_task": [...], "pairs"}``. A length's score
        is the mean over tasks of the per-task mean, as in the bench summary; each row holds ``base``, ``other``,
        ``delta`` and one entry per reference method.

    Raises:
        ValueError: the folders ran different samples, or share none for ``method``.
    """
    config_a, rows_a = _load(base)
    config_b, rows_b = _load(other)
    differ = [k for k in _SAME_SAMPLES if config_a.get(k) != config_b.get(k)]
    if differ:
        details = ", ".join(f"{k}: {config_a.get(k)!r} vs {config_b.get(k)!r}" for k in differ)
        raise ValueError(f"{base} and {other} ran different samples ({details}); nothing to pair")

    def by_sample(rows: list[dict], name: str) -> dict[tuple, dict]:
        return {(r["task"], int(r["length"]), int(r["sample"])): r for r in rows if r["method"] == name}

    references = list(references)
    a, b = by_sample(rows_a, method), by_sample(rows_b, method)
    refs = {name: by_sample(rows_a, name) for name in references}
    keys = sorted(set(a).intersection(b, *refs.values()))
    if not keys:
        raise ValueError(f"no sample of method {method!r} is finished in both {base} and {other}")
    for key in keys:
        if a[key]["prompt_tokens"] != b[key]["prompt_tokens"]:
            raise ValueError(
                f"sample {key} has a {a[key]['prompt_tokens']}-token prompt in {base} but "
                f"{b[key]['prompt_tokens']} in {other}: the folders do not hold the same samples"
            )
    cells = {"base": _task_means([a[k] for k in keys]), "other": _task_means([b[k] for k in keys])}
    cells.update({name: _task_means([rows[k] for k in keys]) for name, rows in refs.items()})
    count: dict[tuple[int, str], int] = defaultdict(int)
    for task, length, _ in keys:
        count[(length, task)] += 1

    per_length = []
    for length in sorted({k[0] for k in cells["base"]}):
        tasks = sorted(t for n, t in cells["base"] if n == length)
        row = {
            "length": length,
            "tasks": len(tasks),
            "pairs": sum(count[(length, t)] for t in tasks),
            **{side: mean(c[(length, t)] for t in tasks) for side, c in cells.items()},
        }
        row["delta"] = row["other"] - row["base"]
        per_length.append(row)

    per_task = []
    for task in sorted({k[1] for k in cells["base"]}):
        lengths = [n for n, t in cells["base"] if t == task]
        row = {
            "task": task,
            "pairs": sum(count[(n, task)] for n in lengths),
            # pooled over lengths as the mean of the per-length means, so each length weighs the same
            **{side: mean(c[(n, task)] for n in lengths) for side, c in cells.items()},
        }
        row["delta"] = row["other"] - row["base"]
        per_task.append(row)
    per_task.sort(key=lambda r: r["delta"])
    return {
        "method": method,
        "references": references,
        "base": str(base),
        "other": str(other),
        "changes": _setting_changes(config_a, config_b),
        "per_length": per_length,
        "per_task": per_task,
        "pairs": len(keys),
    }


def comparison_markdown(result: dict) -> str:
    """The comparison as markdown: one table per length, one per task (largest loss first)."""
    refs = result["references"]
    changes = "; ".join(result["changes"]) or "no recorded setting differs"
    lines = [
        f"# `{result['method']}`: `{result['other']}` against `{result['base']}`",
        "",
        f"{result['pairs']} samples finished in both folders. Settings changed: {changes}.",
        "",
    ]
    head = ["length", "samples", "base", "other", "delta", *refs]
    lines += ["| " + " | ".join(head) + " |", "|" + "---:|" * len(head)]
    for r in result["per_length"]:
        cols = [str(r["length"]), str(r["pairs"]), f"{r['base']:.1f}", f"{r['other']:.1f}", f"{r['delta']:+.1f}"]
        lines.append("| " + " | ".join(cols + [f"{r[name]:.1f}" for name in refs]) + " |")
    head = ["task", "samples", "base", "other", "delta", *refs]
    lines += ["", "| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
    for r in result["per_task"]:
        cols = [r["task"], str(r["pairs"]), f"{r['base']:.1f}", f"{r['other']:.1f}", f"{r['delta']:+.1f}"]
        lines.append("| " + " | ".join(cols + [f"{r[name]:.1f}" for name in refs]) + " |")
    return "\n".join(lines) + "\n"
