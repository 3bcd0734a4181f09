"""Training examples from dumps: (lookahead hidden state, position) -> which candidate chunks the next cycle needs."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from ..dump.labels import from_csr, lookahead_targets
from ..dump.shards import DumpError, iter_records, read_manifest


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

    @property
    def num_steps(self) -> int:
        return self.targets.shape[0]


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


def load_examples(
    dirs: Sequence[str | Path],
    *,
    split: str | None,
    interval: int,
    recent: int,
    frequent: float = 0.8,
    frequent_weight: float = 0.2,
) -> list[PromptExamples]:
    """Read every prompt of ``dirs`` (of one split) and build its lookahead targets.

    Args:
        dirs: dump folders.
        split: ``"train"``, ``"validation"`` or None for all.
        interval: decode steps a resident set serves.
        recent: tokens always resident at the end; chunks there are not the indexer's to choose.
        frequent: a chunk positive in more than this fraction of a prompt's steps is down-weighted...
        frequent_weight: ...to this weight (attention sinks and the question itself are easy positives).
    """
    manifest = check_compatible(dirs)
    chunk = manifest["labels"]["chunk_size"]
    out = []
    for d in dirs:
        for meta, rec in iter_records(d, split):
            n = rec["chunk_keys"].shape[2]
            golden = from_csr(rec)
            targets = lookahead_targets(golden, interval, n)
            if targets.shape[0] == 0:
                continue
            pos = rec["positions"][: targets.shape[0]]
            ends = (torch.arange(n) + 1) * chunk
            candidates = ends[None, :] <= (pos[:, None] + 1 - recent)
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
                )
            )
    if not out:
        raise DumpError(f"no usable {split or ''} prompts in {', '.join(map(str, dirs))}")
    return out
