"""LongBench-v2 samples for the benchmark runner: published items from ``data.json`` or local items, and scoring."""

from __future__ import annotations

from pathlib import Path

from ..ruler.prompt import fit_size
from ..task_sample import TaskSample, prompt_budget
from .format import DIFFICULTIES, LongBenchItem, load_longbench
from .local import LOCAL_TASKS, ContextTooSmall, length_bucket, local_item, max_size
from .prompt import ANSWER_PREFIX, QUESTION_MARKER, render_prompt, score_choice, truncate_middle

# The answer is one letter after the prefix; a few more tokens let the model close the parenthesis.
MAX_NEW_TOKENS = 16
# Seeds of the local task are strings in their own namespace, so they never coincide with the integer seeds of
# the training-prompt generators (flashmemory.dump), whatever numbers either side is given.
SEED_NAMESPACE = "longbench-v2-local"
_MAX_MIN_SIZE = 256
_DRAWS = 8


def generate_longbench(
    task: str, tokenizer, *, length: int, num_samples: int, seed: int, data: str | Path | None = None
) -> list[TaskSample]:
    """LongBench-v2 samples of ``task`` whose prompt, chat template and answer fit ``length`` tokens.

    Args:
        task: a domain's task name (:data:`~flashmemory.bench.longbench.format.LONGBENCH_TASKS`); without
            ``data`` one of :data:`~flashmemory.bench.longbench.local.LOCAL_TASKS`.
        tokenizer: the model's tokenizer; lengths are counted with it.
        length: total tokens (prompt plus ``MAX_NEW_TOKENS``).
        num_samples: how many; published data gives its first ``num_samples`` items of the domain (all of
            them when it has fewer).
        seed: seed of the local items (unused for published data).
        data: path of LongBench-v2's ``data.json``; None builds local items.

    Returns:
        Samples in order; published contexts longer than the budget are cut in the middle, as LongBench-v2 does.
    """
    budget = prompt_budget(tokenizer, length, MAX_NEW_TOKENS, f"\n\n{ANSWER_PREFIX}")
    if data is not None:
        items = [item for item in load_longbench(data) if item.task == task][:num_samples]
        return [_sample(task, i, item, tokenizer, length, budget) for i, item in enumerate(items)]
    if task not in LOCAL_TASKS:
        raise ValueError(f"the local LongBench-v2 task set has {', '.join(LOCAL_TASKS)}; {task} needs --data "
                         "with LongBench-v2's data.json")  # fmt: skip
    return [_sample(task, i, _fit_local(task, tokenizer, length, budget, seed, i), tokenizer, length, budget)
            for i in range(num_samples)]  # fmt: skip


def _fit_local(task: str, tokenizer, length: int, budget: int, seed: int, index: int) -> LongBenchItem:
    # Alternate difficulties so that any run of two or more samples has both.
    difficulty = DIFFICULTIES[index % 2]
    label = length_bucket(length)
    smallest = None
    # A draw whose smallest askable context is still over the budget (a few long functions) is replaced by the
    # next draw of the same sample; each draw is a fixed function of its key, so the result stays deterministic.
    for draw in range(_DRAWS):
        key = f"{SEED_NAMESPACE}:{task}:{seed}:{index}" + (f":{draw}" if draw else "")

        def build(size: int, key: str = key) -> LongBenchItem | None:
            try:
                return local_item(task, key, size, difficulty, label)
            except ContextTooSmall:
                return None

        def count(size: int) -> int:
            item = build(size)
            # A size that allows no question counts as too big, so the search settles on one that does.
            return budget + 1 if item is None else len(tokenizer.encode(render_prompt(item), add_special_tokens=False))

        low = next((n for n in range(4, _MAX_MIN_SIZE) if build(n) is not None), None)
        if low is None:
            continue
        tokens = count(low)
        smallest = tokens if smallest is None else min(smallest, tokens)
        if tokens <= budget:
            item = build(fit_size(count, budget, low=low, high=max_size(task)))
            if item is None:  # fit_size returns low or a size that fits, and both build
                raise RuntimeError(f"no {task} item at the fitted size")
            return item
    if smallest is None:
        raise ValueError(f"could not build a {difficulty} {task} question from the local sources")
    raise ValueError(f"length {length} is too short for a local {task} item ({smallest} tokens at least)")


def _sample(task: str, index: int, item: LongBenchItem, tokenizer, length: int, budget: int) -> TaskSample:
    text, num_tokens = truncate_middle(render_prompt(item), tokenizer, budget)
    return TaskSample(
        task=task,
        index=index,
        input=f"{text}\n\n{ANSWER_PREFIX}",
        outputs=[item.answer],
        length=length,
        answer_prefix=ANSWER_PREFIX,
        num_tokens=num_tokens,
        max_new_tokens=MAX_NEW_TOKENS,
        info={"sample_id": item.id, "sub_domain": item.sub_domain, "answer": item.answer},
        buckets={"difficulty": item.difficulty, "length": item.length},
        question_marker=QUESTION_MARKER,
    )


def score_longbench(sample: TaskSample, prediction: str) -> float:
    """100.0 when the letter LongBench-v2's patterns read from the answer prefix plus ``prediction`` is right."""
    return score_choice(sample.answer_prefix + prediction, sample.outputs[0])
