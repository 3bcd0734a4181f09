"""One result row of a benchmark: decode one sample with one method, score it by its task set's rules."""

from __future__ import annotations

from ..config import LSAConfig
from .longbench import score_longbench
from .longmemeval import score_longmemeval
from .method_base import followup_len
from .ruler import score_ruler


def score_prediction(family: str, sample, prediction: str) -> float:
    """The score of ``prediction`` for ``sample`` (0-100), by the rules of the task set ``family``."""
    if family == "longbench-v2":
        return score_longbench(sample, prediction)
    if family == "longmemeval":
        return score_longmemeval(sample, prediction)
    return score_ruler(sample.task, [prediction], [sample.outputs])


def run_row(method, model, tokenizer, enc: dict, sample, cfg: LSAConfig, family: str = "ruler") -> dict:
    """Greedy-decode ``sample`` (already encoded as ``enc``) with ``method``; the JSON row of ``results.jsonl``."""
    followup = enc.get("followup_ids")
    ids, stats = method.run(
        model,
        tokenizer,
        enc["input_ids"],
        enc["attention_mask"],
        max_new_tokens=sample.max_new_tokens,
        lsa=cfg,
        followup=followup,
    )
    pred = tokenizer.decode(ids[0], skip_special_tokens=True)
    full = stats.kv_bytes_full or stats.kv_bytes_device
    return {
        "task": sample.task,
        "length": sample.length,
        "sample": sample.index,
        "method": method.name,
        "score": score_prediction(family, sample, pred),
        "prediction": pred,
        "outputs": list(sample.outputs),
        "prompt_tokens": int(enc["input_ids"].shape[1]) + followup_len(followup),
        "new_tokens": stats.new_tokens,
        "kv_bytes_device": stats.kv_bytes_device,
        "kv_bytes_full": full,
        "kv_ratio": stats.kv_bytes_device / full if full else 0.0,
        "prefill_seconds": stats.prefill_seconds,
        "decode_seconds": stats.decode_seconds,
        "boundaries": stats.boundaries,
        "page_slots": stats.page_slots,
        # What a task set adds per sample: the item's id and the labels its summary is grouped by.
        "info": getattr(sample, "info", {}),
        "buckets": getattr(sample, "buckets", {}),
    }


__all__ = ["run_row", "score_prediction"]
