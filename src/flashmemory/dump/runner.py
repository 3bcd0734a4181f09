"""``flashmemory dump``: prompts -> backbone with full attention -> sharded records, resumable."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

import torch
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from torch import nn

from ..indexer.checkpoint import save_indexer
from ..indexer.memory_indexer import MemoryIndexer
from ..models.adapter import backbone_spec
from .capture import LabelConfig, capture_prompt
from .shards import FORMAT, MANIFEST, DumpError, read_manifest, write_json_atomic, write_shard

INIT_INDEXER = "init_indexer"
# Backbones whose dumps need their own capture (labels, keys, tower), by config ``model_type``; the module is
# imported only when such a model is dumped. It provides label_config, default_target_layers, init_indexer and
# capture_prompt with the signatures of the generic ones below.
CAPTURE_BACKENDS = {"deepseek_v4": "flashmemory.deepseek_v4.capture"}


class GenericCapture:
    """Capture for decoder models with full-attention layers: labels from attention mass per chunk."""

    @staticmethod
    def label_config(model: nn.Module, labels: LabelConfig) -> LabelConfig:
        return labels

    @staticmethod
    def default_target_layers(model: nn.Module) -> tuple[int, ...]:
        return backbone_spec(model).default_target_layers()

    @staticmethod
    def init_indexer(model: nn.Module, targets: tuple[int, ...], **kwargs) -> MemoryIndexer:
        return MemoryIndexer.from_model(model, targets, **kwargs)

    @staticmethod
    def capture_prompt(*args, **kwargs) -> dict[str, torch.Tensor]:
        return capture_prompt(*args, **kwargs)


def capture_backend(model: nn.Module):
    """The capture backend of ``model``: :data:`CAPTURE_BACKENDS` by model type, else :class:`GenericCapture`."""
    from importlib import import_module

    name = CAPTURE_BACKENDS.get(getattr(model.config, "model_type", ""))
    return GenericCapture if name is None else import_module(name)


def encode_chat(tokenizer, text: str, answer_prefix: str = "") -> torch.Tensor:
    """Token ids of ``text`` as one user turn (the way ``flashmemory.generate`` prompts the model).

    ``answer_prefix`` follows the generation prompt: the model's answer goes on from it.
    """
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True
        )
        return tokenizer(text + answer_prefix, return_tensors="pt", add_special_tokens=False)["input_ids"]
    return tokenizer(f"{text}\n\n{answer_prefix}" if answer_prefix else text, return_tensors="pt")["input_ids"]


def run_dump(
    model: nn.Module,
    tokenizer,
    prompts: Sequence,
    out: str | Path,
    *,
    backbone: str,
    fingerprint: str,
    labels: LabelConfig | None = None,
    target_layers: tuple[int, ...] | None = None,
    max_new_tokens: int = 96,
    shard_size: int = 8,
    progress: bool = True,
    token_keys: bool = False,
    feedback_window: int | None = None,
) -> dict:
    """Dump ``prompts`` (objects with ``text``, ``kind``, ``doc_ids`` and optionally ``split``) into ``out``.

    A folder that already holds a dump of the same backbone and settings is resumed: finished prompts are
    skipped. Anything else in ``out`` is refused rather than overwritten. ``token_keys`` also records every key
    of the target layers (about ``2 * Hkv * D`` bytes per token and layer), for token-key scoring in
    ``indexer-eval``. ``feedback_window`` prompt tokens (the last one included) also get golden labels: the
    attention the runtime sees at the end of the prefill, which the indexer's feedback input counts (default:
    64 where the capture supports it, else 0).

    Returns:
        The manifest.
    """
    backend = capture_backend(model)
    labels = backend.label_config(model, labels or LabelConfig())
    out = Path(out)
    targets = tuple(target_layers or backend.default_target_layers(model))
    settings = {
        "backbone": backbone,
        "fingerprint": fingerprint,
        "target_layers": list(targets),
        "labels": asdict(labels),
        "max_new_tokens": max_new_tokens,
        "num_prompts": len(prompts),
    }
    if token_keys:  # only then, so that dumps made before the option still resume
        settings["token_keys"] = True
    if feedback_window is None:
        feedback_window = 64 if backend is GenericCapture else 0
    if feedback_window < 0:
        raise ValueError(f"feedback_window must be >= 0, got {feedback_window}")
    if feedback_window > 1:
        settings["feedback_window"] = feedback_window
    if (token_keys or feedback_window > 1) and backend is not GenericCapture:
        raise ValueError(
            "token keys and prompt-window labels are recorded for decoder models with full-attention layers only "
            "(use --feedback-window 0)"
        )
    # built first: it checks the target layers before anything is written to ``out``
    init = backend.init_indexer(
        model, targets, chunk_size=labels.chunk_size, backbone=backbone, fingerprint=fingerprint
    )
    if backend is GenericCapture:
        # the reduction the runtime's zero-shot scorer uses on these layers: training starts from what runs
        init.spec.layer_reduce = backbone_spec(model).scorer(target_layers, None)[1]
    # other backends' capture takes neither argument (and refuses them above)
    extra = {"token_keys": token_keys, "feedback_window": feedback_window} if backend is GenericCapture else {}
    manifest = _resumable_manifest(out, settings)
    done = {m["index"] for m in manifest["prompts"]} if manifest else set()
    pending = [i for i in range(len(prompts)) if i not in done]
    # encoded and measured before the first prompt runs, so a prompt the model cannot hold stops the dump before
    # any work instead of after hours of it (or, with positions past the model's window, dumps nonsense)
    encoded = {i: encode_chat(tokenizer, prompts[i].text, getattr(prompts[i], "answer_prefix", "")) for i in pending}
    _check_window(model, encoded, max_new_tokens)
    if manifest is None:
        out.mkdir(parents=True, exist_ok=True)
        manifest = {"format": FORMAT, **settings, "prompts": [], "complete": False}
        write_json_atomic(out / MANIFEST, manifest)
    if not (out / INIT_INDEXER).is_dir():
        save_indexer(init, out / INIT_INDEXER)
    eos = tokenizer.eos_token_id
    eos_ids = [eos] if isinstance(eos, int) else list(eos or [])
    device = next(model.parameters()).device
    columns = (TextColumn("dump"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    with Progress(*columns, disable=not progress) as bar:
        task = bar.add_task("dump", total=len(prompts), completed=len(done))
        for start in range(0, len(pending), shard_size):
            group = pending[start : start + shard_size]
            shard = f"shard-{group[0]:05d}.safetensors"
            records, metas = {}, []
            for i in group:
                p = prompts[i]
                ids = encoded.pop(i).to(device)
                rec = backend.capture_prompt(
                    model,
                    ids,
                    targets=targets,
                    labels=labels,
                    max_new_tokens=max_new_tokens,
                    eos_token_id=eos_ids,
                    **extra,
                )
                key = f"p{i:05d}"
                records[key] = rec
                metas.append(
                    {
                        "index": i,
                        "key": key,
                        "shard": shard,
                        "kind": p.kind,
                        "split": getattr(p, "split", "train"),
                        "doc_ids": list(p.doc_ids),
                        "prompt_tokens": int(ids.shape[1]),
                        "num_steps": int(rec["hidden"].shape[0]),
                        "num_chunks": int(rec["chunk_keys"].shape[2]),
                    }
                )
                bar.advance(task)
            write_shard(out / shard, records)
            manifest["prompts"].extend(metas)
            write_json_atomic(out / MANIFEST, manifest)
    manifest["complete"] = len(manifest["prompts"]) == len(prompts)
    write_json_atomic(out / MANIFEST, manifest)
    return manifest


def _check_window(model: nn.Module, encoded: dict[int, torch.Tensor], max_new_tokens: int) -> None:
    """Refuse prompts that with ``max_new_tokens`` more would run past the model's context window."""
    limit = getattr(model.config, "max_position_embeddings", None)
    if limit is None:
        return
    over = [(i, int(ids.shape[1])) for i, ids in encoded.items() if ids.shape[1] + max_new_tokens > limit]
    if over:
        shown = ", ".join(f"prompt {i} ({n} tokens)" for i, n in over[:5]) + (" ..." if len(over) > 5 else "")
        raise ValueError(
            f"{len(over)} prompt(s) with {max_new_tokens} decoded tokens run past the model's window of {limit} "
            f"tokens: {shown} (prompts numbered from 0 in --data order); shorten them or lower --max-new-tokens"
        )


def _resumable_manifest(out: Path, settings: dict) -> dict | None:
    """The manifest of a dump in ``out`` to resume, None for a new one; refuses a folder it must not write into."""
    if (out / MANIFEST).is_file():
        manifest = read_manifest(out)
        mismatch = [k for k, v in settings.items() if manifest.get(k) != v]
        if mismatch:
            raise DumpError(
                f"{out} already holds a dump with other settings ({', '.join(mismatch)}); "
                "use a new --out folder or delete the old one"
            )
        return manifest
    if out.exists() and any(out.iterdir()):
        raise DumpError(f"{out} exists and is not a dump folder; refusing to write into it")
    return None
