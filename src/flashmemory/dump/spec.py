"""``--data`` of ``flashmemory dump``: a JSONL file of prompts, or settings of the built-in generators."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True, slots=True)
class DumpPrompt:
    """One prompt to dump, with the split it belongs to."""

    text: str
    kind: str
    doc_ids: tuple[str, ...]
    split: str
    answer_prefix: str = ""  # the start of the model's answer, after the chat template's generation prompt


DEFAULTS = {"n": 64, "val": 8, "min": 2048, "max": 6144, "seed": 0, "kinds": "all"}


def parse_spec(spec: str) -> dict:
    """``"n=64,val=8,min=2048,max=6144,seed=0,kinds=keyed_fact+multi_hop"`` -> settings (defaults filled in)."""
    out = dict(DEFAULTS)
    for part in filter(None, (p.strip() for p in spec.split(","))):
        if "=" not in part:
            raise ValueError(f"--data item {part!r} is not key=value (keys: {', '.join(DEFAULTS)})")
        key, value = (s.strip() for s in part.split("=", 1))
        if key not in DEFAULTS:
            raise ValueError(f"unknown --data key {key!r}; known: {', '.join(DEFAULTS)}")
        out[key] = value if key == "kinds" else int(value)
    if out["n"] < 1 or out["val"] < 0 or not 0 < out["min"] <= out["max"]:
        raise ValueError(f"--data needs n >= 1, val >= 0 and 0 < min <= max, got {out}")
    return out


def read_jsonl(path: Path) -> list[DumpPrompt]:
    """Prompts from a JSONL file, one per line.

    Each line is ``{"text": ..., "kind"?: ..., "split"?: "train"|"validation", "answer_prefix"?: ...}``.
    """
    prompts = []
    for i, line in enumerate(path.read_text(encoding="utf-8").splitlines()):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            text = row["text"]
        except (json.JSONDecodeError, KeyError, TypeError):
            raise ValueError(f"{path}:{i + 1} is not a JSON object with a 'text' field") from None
        if not str(text).strip():
            raise ValueError(f"{path}:{i + 1} has an empty prompt")
        split = row.get("split", "train")
        if split not in ("train", "validation"):
            raise ValueError(f"{path}:{i + 1} split must be 'train' or 'validation', got {split!r}")
        doc_ids = tuple(row.get("doc_ids") or (f"{path.name}:{i + 1}",))
        prefix = str(row.get("answer_prefix") or "")
        prompts.append(DumpPrompt(str(text), row.get("kind", "file"), doc_ids, split, prefix))
    if not prompts:
        raise ValueError(f"{path} holds no prompts")
    return prompts


def build_prompts(spec: str, tokenizer) -> list[DumpPrompt]:
    """Prompts for ``--data``: an existing file is read as JSONL, anything else configures the generators."""
    path = Path(spec)
    if path.suffix == ".jsonl" or path.exists():
        if not path.is_file():
            raise FileNotFoundError(f"--data file not found: {path}")
        return read_jsonl(path)
    from .prompts import EXTRA_KINDS, PROMPT_KINDS, training_prompts

    cfg = parse_spec(spec)
    # "all+copy_back": the default kinds and named extra ones
    parts = cfg["kinds"].split("+")
    kinds = tuple(dict.fromkeys(k for part in parts for k in (PROMPT_KINDS if part == "all" else (part,))))
    unknown = set(kinds) - set(PROMPT_KINDS + EXTRA_KINDS)
    if unknown:
        raise ValueError(
            f"unknown prompt kinds {sorted(unknown)}; known: {', '.join(PROMPT_KINDS + EXTRA_KINDS)}, or all"
        )
    out = []
    for split, n, seed in (
        ("train", cfg["n"], cfg["seed"]),
        ("validation", cfg["val"], cfg["seed"] + 10_000),
    ):
        if n == 0:
            continue
        made = training_prompts(
            tokenizer,
            num_prompts=n,
            min_tokens=cfg["min"],
            max_tokens=cfg["max"],
            seed=seed,
            split=split,
            kinds=kinds,
        )
        out += [DumpPrompt(p.text, p.kind, tuple(p.doc_ids), split, p.answer_prefix) for p in made]
    return out
