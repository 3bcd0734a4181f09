"""RULER's metrics (``long_context_eval/eval/synthetic/constants.py``) and its prediction clean-up."""

from __future__ import annotations

import re

_CONTROL = re.compile(r"[\x00-\x1f]")


def postprocess_pred(prediction: str | None) -> str:
    """RULER's ``postprocess_pred``: strip, and turn control characters into newlines."""
    if prediction is None:
        return ""
    return _CONTROL.sub("\n", prediction.strip()).strip()


def _hit(reference: str, prediction: str) -> float:
    # RULER matches case-insensitive substrings, not tokens, so "1234" also hits inside "91234".
    return 1.0 if reference.lower() in prediction.lower() else 0.0


def string_match_all(predictions: list[str], references: list[list[str]]) -> float:
    """Mean over samples of the fraction of references found in the prediction, in percent (2 decimals)."""
    per_sample = [sum(_hit(r, p) for r in refs) / len(refs) for p, refs in zip(predictions, references, strict=True)]
    return round(sum(per_sample) / len(predictions) * 100, 2)


def string_match_part(predictions: list[str], references: list[list[str]]) -> float:
    """Mean over samples of whether any reference is found in the prediction, in percent (2 decimals)."""
    per_sample = [max(_hit(r, p) for r in refs) for p, refs in zip(predictions, references, strict=True)]
    return round(sum(per_sample) / len(predictions) * 100, 2)
