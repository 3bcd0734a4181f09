"""LongMemEval samples for the benchmark runner: published items or local ones, fitted to a length, and scoring."""

from __future__ import annotations

from pathlib import Path

from ..ruler.prompt import fit_size
from ..task_sample import TaskSample, prompt_budget
from .format import LONGMEMEVAL_TASKS, MemItem, load_longmemeval
from .local import local_item
from .prompt import QUESTION_MARKER, fit_history, render_prompt
from .scoring import score_answer

# Answers are short phrases; a refusal fits as well.
MAX_NEW_TOKENS = 32
# Seeds of local items are strings in their own namespace, never equal to the integer seeds of the training-prompt
# generators (flashmemory.dump).
SEED_NAMESPACE = "longmemeval-local"
_MAX_SIZE = 4096


def generate_longmemeval(
    task: str, tokenizer, *, length: int, num_samples: int, seed: int, data: str | Path | None = None
) -> list[TaskSample]:
    """LongMemEval samples testing ``task`` whose prompt, chat template and answer fit ``length`` tokens.

    Args:
        task: an ability, one of :data:`~flashmemory.bench.longmemeval.format.LONGMEMEVAL_TASKS`.
        tokenizer: the model's tokenizer; lengths are counted with it.
        length: total tokens (prompt plus ``MAX_NEW_TOKENS``).
        num_samples: how many; published data gives its first ``num_samples`` items of the ability (all of them
            when it has fewer).
        seed: seed of the local items (unused for published data).
        data: path of a LongMemEval file (``longmemeval_s.json`` ...); None builds local items.

    Returns:
        Samples in order. A published history longer than the budget loses its oldest sessions.
    """
    if task not in LONGMEMEVAL_TASKS:
        raise ValueError(f"unknown LongMemEval task {task!r}; valid tasks: {', '.join(LONGMEMEVAL_TASKS)}")
    budget = prompt_budget(tokenizer, length, MAX_NEW_TOKENS)

    def count(text: str) -> int:
        return len(tokenizer.encode(text, add_special_tokens=False))

    if data is not None:
        items = [item for item in load_longmemeval(data) if item.task == task][:num_samples]
        return [_sample(task, i, item, [item.answer], count, length, budget) for i, item in enumerate(items)]
    samples = []
    for index in range(num_samples):
        key = f"{SEED_NAMESPACE}:{task}:{seed}:{index}"
        size = fit_size(lambda n, key=key: count(render_prompt(local_item(task, key, n)[0])), budget, low=0,
                        high=_MAX_SIZE)  # fmt: skip
        item, answers = local_item(task, key, size)
        samples.append(_sample(task, index, item, answers, count, length, budget))
    return samples


def _sample(task: str, index: int, item: MemItem, answers: list[str], count, length: int, budget: int) -> TaskSample:
    text, num_tokens, kept = fit_history(item, count, budget)
    kept_ids = {item.session_ids[i] for i in kept}
    return TaskSample(
        task=task,
        index=index,
        input=text,
        outputs=answers,
        length=length,
        answer_prefix="",
        question_marker=QUESTION_MARKER,
        num_tokens=num_tokens,
        max_new_tokens=MAX_NEW_TOKENS,
        info={
            "sample_id": item.question_id,
            "sessions": len(item.sessions),
            "sessions_dropped": len(item.sessions) - len(kept),
            "evidence_dropped": sum(1 for s in item.answer_session_ids if s not in kept_ids),
        },
        buckets={"question_type": item.question_type + ("_abs" if item.is_abstention else "")},
    )


def score_longmemeval(sample: TaskSample, prediction: str) -> float:
    """100.0 for a right answer (or, on an abstention question, a refusal), else 0.0; rules of ``scoring``."""
    return score_answer(prediction, sample.outputs, abstention=sample.task == "abstention")
