"""Training examples from dumps: (lookahead hidden state, position) -> which candidate chunks the next cycle needs."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from ..dump.labels import decidable_chunks, from_csr, lookahead_peak, lookahead_targets
from ..dump.shards import DumpError, iter_records, read_manifest
from ..indexer.feedback import fit_chunks


@dataclass(slots=True)
class PromptExamples:
    """All steps of one dumped prompt.

    Args:
        hidden: hidden states of the lookahead token per target layer. # [S, L, hidden]
        positions: absolute position of that token. # [S]
        targets: chunks needed in the next ``interval`` steps. # [S, N]
        candidates: chunks the indexer must decide on (complete and older than the recent tail). # [S, N]
        keys: frozen chunk keys. # [L, Hkv, N, D]
        kmin: per-chunk minimum keys (for the page-bound baseline). # [L, Hkv, N, D]
        kmax: per-chunk maximum keys. # [L, Hkv, N, D]
        weights: down-weights chunks positive in most steps of the prompt. # [N]
        kind: prompt kind.
        prefix_hidden: hidden states of the prompt tokens just before step 0, which join it in the first
            lookahead window (empty for dumps that did not record them). # [P, L, hidden]
        prefix_positions: their positions. # [P]
        strength: how strongly the lookahead needs each chunk (its peak single-head mass), for peak targets;
            None otherwise. # [S, N]
        token_keys: every key of the complete chunks, for dumps made with ``--token-keys``. # [L, Hkv, N*C, D]
        golden: golden chunks of every recorded step, the last one included. # [S+1, N]
        prompt_hits: for dumps with prompt-window labels, how many of the window's tokens (step 0 included) have
            each chunk golden; None otherwise. # [N]
        prompt_rows: tokens of that window.
        layer_mass: each layer's attention mass per chunk at every step, for dumps that recorded it. # [S+1, L', N]
        chunk_size: tokens per chunk.
    """

    hidden: torch.Tensor
    positions: torch.Tensor
    targets: torch.Tensor
    candidates: torch.Tensor
    keys: torch.Tensor
    kmin: torch.Tensor
    kmax: torch.Tensor
    weights: torch.Tensor
    kind: str
    prefix_hidden: torch.Tensor | None = None
    prefix_positions: torch.Tensor | None = None
    strength: torch.Tensor | None = None
    token_keys: torch.Tensor | None = None
    golden: torch.Tensor | None = None
    prompt_hits: torch.Tensor | None = None
    prompt_rows: int = 0
    layer_mass: torch.Tensor | None = None
    chunk_size: int = 16

    @property
    def num_steps(self) -> int:
        return self.targets.shape[0]

    def windows(self, steps: torch.Tensor, window: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The lookahead windows ending at ``steps``: the ``window`` newest tokens, prompt prefix included.

        Returns:
            Hidden states ``[S, W, L, hidden]``, positions ``[S, W]`` and which slots hold a token ``[S, W]``.
        """
        hidden, positions = self.hidden, self.positions
        if self.prefix_hidden is not None and self.prefix_hidden.shape[0]:
            hidden = torch.cat([self.prefix_hidden.to(hidden.dtype), hidden])
            positions = torch.cat([self.prefix_positions.to(positions.dtype), positions])
        p = hidden.shape[0] - self.hidden.shape[0]
        idx = steps[:, None] + p - torch.arange(window - 1, -1, -1)[None, :]
        valid = idx >= 0
        idx = idx.clamp(min=0)
        return hidden[idx], positions[idx], valid


def check_compatible(dirs: Sequence[str | Path]) -> dict:
    """Manifests of ``dirs`` must share backbone fingerprint, target layers and labels; returns the first."""
    if not dirs:
        raise DumpError("no dump folders given")
    manifests = [read_manifest(d) for d in dirs]
    first = manifests[0]
    for d, m in zip(dirs[1:], manifests[1:], strict=True):
        for key in ("fingerprint", "target_layers", "labels"):
            if m.get(key) != first.get(key):
                raise DumpError(f"dump {d} differs from {dirs[0]} in {key}: cannot train on both")
    return first


TARGETS = ("golden", "peak", "target-peak")
# the dump field each peak target reads, and what it says
PEAK_FIELDS = {
    "peak": ("peak", "some head of some layer"),
    "target-peak": ("peak_target", "some head of a target layer"),
}


def step_targets(
    rec: dict[str, torch.Tensor], target: str, interval: int, peak_threshold: float
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Which chunks each step's lookahead needs, by the chosen label: ``"golden"`` (the union of golden chunks over
    the next ``interval`` steps), ``"peak"`` (some head of some layer puts at least ``peak_threshold`` of its
    attention on the chunk in one of those steps) or ``"target-peak"`` (the same, counting only the heads of the
    target layers, whose keys the indexer scores).

    Returns:
        Targets ``[S-1, N]`` and, for the peak targets, the lookahead peak mass itself ``[S-1, N]`` (else None).
    """
    n = rec["chunk_keys"].shape[2]
    if target == "golden":
        return lookahead_targets(from_csr(rec), interval, n), None
    if target in PEAK_FIELDS:
        if not 0.0 < peak_threshold <= 1.0:
            raise ValueError(f"peak_threshold must be in (0, 1], got {peak_threshold}")
        field, what = PEAK_FIELDS[target]
        if field not in rec:
            raise DumpError(
                f"this dump has no peak masses of {what} (made before they were recorded, or by a backbone without "
                f"per-head attention): dump again, or train on target 'golden'"
            )
        strength = lookahead_peak(rec[field], interval, n)
        return strength >= peak_threshold, strength
    raise ValueError(f"target must be one of {TARGETS}, got {target!r}")


def load_examples(
    dirs: Sequence[str | Path],
    *,
    split: str | None,
    interval: int,
    recent: int,
    sink: int = 16,
    frequent: float = 0.8,
    frequent_weight: float = 0.2,
    target: str = "golden",
    peak_threshold: float = 0.3,
) -> list[PromptExamples]:
    """Read every prompt of ``dirs`` (of one split) and build its lookahead targets.

    Args:
        dirs: dump folders.
        split: ``"train"``, ``"validation"`` or None for all.
        interval: decode steps a resident set serves.
        recent: tokens always resident at the end; chunks there are not the indexer's to choose.
        sink: tokens always resident at the start; chunks touching them are not the indexer's either.
        frequent: a chunk positive in more than this fraction of a prompt's steps is down-weighted...
        frequent_weight: ...to this weight (attention sinks and the question itself are easy positives).
        target: which label the lookahead targets come from, see :func:`step_targets`.
        peak_threshold: single-head mass that makes a chunk needed, for ``target="peak"``.
    """
    manifest = check_compatible(dirs)
    chunk = manifest["labels"]["chunk_size"]
    out = []
    for d in dirs:
        for meta, rec in iter_records(d, split):
            n = rec["chunk_keys"].shape[2]
            targets, strength = step_targets(rec, target, interval, peak_threshold)
            if targets.shape[0] == 0:
                continue
            pos = rec["positions"][: targets.shape[0]]
            golden, prompt_hits, rows = _golden_rows(rec, n)
            candidates = decidable_chunks(n, pos + 1, chunk, sink, recent)
            targets &= candidates
            freq = targets.float().sum(0) / max(1, targets.shape[0])
            weights = torch.where(freq > frequent, torch.tensor(frequent_weight), torch.tensor(1.0))
            out.append(
                PromptExamples(
                    hidden=rec["hidden"][: targets.shape[0]],
                    positions=pos,
                    targets=targets,
                    candidates=candidates,
                    keys=rec["chunk_keys"],
                    kmin=rec["chunk_kmin"],
                    kmax=rec["chunk_kmax"],
                    weights=weights,
                    kind=meta.get("kind", ""),
                    prefix_hidden=rec.get("prefix_hidden"),
                    prefix_positions=rec.get("prefix_positions"),
                    strength=None if strength is None else strength * candidates,
                    token_keys=rec.get("token_keys"),
                    golden=golden,
                    prompt_hits=prompt_hits,
                    prompt_rows=rows,
                    layer_mass=None if "layer_mass" not in rec else fit_chunks(rec["layer_mass"], n),
                    chunk_size=chunk,
                )
            )
    if not out:
        raise DumpError(f"no usable {split or ''} prompts in {', '.join(map(str, dirs))}")
    return out


def _golden_rows(rec: dict[str, torch.Tensor], n: int) -> tuple[torch.Tensor, torch.Tensor | None, int]:
    """Per-step golden flags ``[S+1, N]`` and, for dumps with prompt-window labels, the window's golden count per
    chunk ``[N]`` (step 0, the prompt's last token, included) and the window's length."""
    golden = torch.zeros(rec["indptr"].shape[0] - 1, n, dtype=torch.bool)
    for s, ids in enumerate(from_csr(rec)):
        golden[s, ids[ids < n]] = True
    if "prefix_indptr" not in rec:
        return golden, None, 0
    prefix = from_csr({k.removeprefix("prefix_"): v for k, v in rec.items() if k.startswith("prefix_")})
    hits = golden[0].long()
    for ids in prefix:
        hits[ids[ids < n]] += 1
    return golden, hits, len(prefix) + 1
