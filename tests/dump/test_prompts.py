"""Training prompt generators: deterministic, sized, split-clean and disjoint from the evaluation text."""

from __future__ import annotations

import re

import pytest

from flashmemory.bench.corpus import stdlib_paragraphs
from flashmemory.dump.prompts import PROMPT_KINDS, TrainPrompt, training_prompts
from flashmemory.dump.sources import (
    DEBIAN_DOC_KIND,
    MIN_DOC_CHARS,
    STDLIB_KIND,
    debian_doc_documents,
    excluded_stdlib_top_levels,
    split_documents,
    stdlib_source_documents,
)

MIN_TOKENS, MAX_TOKENS = 600, 1800


class WhitespaceTokenizer:
    """Stand-in for a Hugging Face tokenizer: one token per whitespace-separated word, nothing downloaded."""

    def __call__(self, text: str, add_special_tokens: bool = True) -> dict[str, list[int]]:
        return {"input_ids": [0] * len(text.split())}


def _count(text: str) -> int:
    return len(text.split())


def _make(seed: int = 0, split: str = "train", num_prompts: int = 10, **kwargs) -> list[TrainPrompt]:
    return training_prompts(
        WhitespaceTokenizer(), num_prompts=num_prompts, min_tokens=MIN_TOKENS, max_tokens=MAX_TOKENS,
        seed=seed, split=split, **kwargs,
    )  # fmt: skip


@pytest.fixture(scope="module")
def train_prompts() -> list[TrainPrompt]:
    return _make(seed=0)


@pytest.fixture(scope="module")
def validation_prompts() -> list[TrainPrompt]:
    return _make(seed=0, split="validation")


def test_same_seed_gives_same_prompts(train_prompts):
    assert _make(seed=0) == train_prompts


def test_different_seed_gives_different_prompts(train_prompts):
    other = _make(seed=1)
    assert [p.text for p in other] != [p.text for p in train_prompts]
    assert not {p.text for p in other} & {p.text for p in train_prompts}


def test_lengths_within_range(train_prompts, validation_prompts):
    for p in train_prompts + validation_prompts:
        assert 0.95 * MIN_TOKENS <= _count(p.text) <= 1.05 * MAX_TOKENS, (p.kind, _count(p.text))


def test_lengths_spread_over_range():
    # Targets are uniform in [min, max]: twenty prompts should not all sit at one end.
    lengths = [_count(p.text) for p in _make(seed=3, num_prompts=20)]
    assert min(lengths) < MIN_TOKENS + (MAX_TOKENS - MIN_TOKENS) / 3
    assert max(lengths) > MAX_TOKENS - (MAX_TOKENS - MIN_TOKENS) / 3


def test_every_kind_is_generated(train_prompts, validation_prompts):
    assert sorted(p.kind for p in train_prompts) == sorted(PROMPT_KINDS * 2)
    assert {p.kind for p in validation_prompts} == set(PROMPT_KINDS)


def test_kinds_argument_restricts_output():
    prompts = _make(seed=5, num_prompts=3, kinds=("code_qa",))
    assert [p.kind for p in prompts] == ["code_qa"] * 3
    assert all(doc_id.startswith("stdlib/") for p in prompts for doc_id in p.doc_ids)


def test_train_and_validation_documents_are_disjoint(train_prompts, validation_prompts):
    train_ids = {d for p in train_prompts for d in p.doc_ids}
    val_ids = {d for p in validation_prompts for d in p.doc_ids}
    assert train_ids and val_ids
    assert not train_ids & val_ids
    _, val_docs = split_documents(stdlib_source_documents() + debian_doc_documents())
    assert val_ids <= {d.doc_id for d in val_docs}


def test_doc_ids_name_the_documents_used(train_prompts):
    for p in train_prompts:
        assert p.doc_ids and len(set(p.doc_ids)) == len(p.doc_ids)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # the eval corpus reads typing.io's docstring
def test_no_evaluation_text(train_prompts, validation_prompts):
    eval_paragraphs = stdlib_paragraphs()
    excluded = excluded_stdlib_top_levels()
    for p in train_prompts + validation_prompts:
        assert "access code" not in p.text.lower()
        flat = " ".join(p.text.split())
        leaked = [para[:60] for para in eval_paragraphs if para in flat]
        assert not leaked, (p.kind, leaked)
        for doc_id in p.doc_ids:
            if doc_id.startswith("stdlib/"):
                assert re.split(r"[/.]", doc_id.removeprefix("stdlib/"))[0] not in excluded, doc_id


def test_answers_are_in_the_prompt(train_prompts, validation_prompts):
    for p in train_prompts + validation_prompts:
        if p.kind in ("keyed_fact", "multi_hop", "multi_turn"):
            assert p.answer and p.answer in p.text, (p.kind, p.answer)
        # The question itself comes after the last planted fact, so the answer is not just the final line.
        if p.kind in ("keyed_fact", "multi_hop"):
            assert p.answer not in p.text.rsplit("\n", 1)[-1]


def test_keyed_fact_has_similar_key_distractors(train_prompts):
    for p in (p for p in train_prompts if p.kind == "keyed_fact"):
        question = p.text.rsplit("\n", 1)[-1]
        key = re.search(r"\b([A-Z]{2,3})-(\d{4,5})\b", question)
        assert key, question
        records = set(re.findall(r"\b[A-Z]{2,3}-\d{4,5}\b", p.text)) - {key.group(0)}
        prefix, digits = key.groups()
        # One edit away: same letters or same digits (a changed or swapped digit, or a changed letter).
        near = [r for r in records if r.split("-")[0] == prefix or r.split("-")[1] == digits]
        assert near, (key.group(0), records)


def test_multi_turn_is_a_transcript(train_prompts):
    for p in (p for p in train_prompts if p.kind == "multi_turn"):
        assert p.text.count("=== Session ") >= 4  # three or more earlier sessions and today's
        assert "User:" in p.text and "Assistant:" in p.text


def test_code_qa_asks_about_a_function_in_the_code(train_prompts, validation_prompts):
    for p in (p for p in train_prompts + validation_prompts if p.kind == "code_qa"):
        assert p.answer
        asked = re.search(r"`([\w.]+)`", p.text.rsplit("\n", 1)[-1])
        if asked:  # a prompt too short for any whole function falls back to asking for the first file
            assert f"def {asked.group(1).split('.')[-1]}(" in p.text
        if p.answer.startswith("stdlib/"):
            assert f"# ===== File: {p.answer} =====" in p.text


def test_continuation_ends_with_an_instruction(train_prompts):
    for p in (p for p in train_prompts if p.kind == "continuation"):
        last = p.text.rsplit("\n", 1)[-1]
        assert last.startswith(("Continue", "Write", "Summarise", "What are"))
        if p.answer is not None:
            assert p.answer.split()[0] not in last


def test_bad_arguments_raise():
    with pytest.raises(ValueError):
        _make(split="test")
    with pytest.raises(ValueError):
        _make(kinds=("haystack",))
    with pytest.raises(ValueError):
        training_prompts(WhitespaceTokenizer(), num_prompts=1, min_tokens=100, max_tokens=50, seed=0)


def test_sources_are_sorted_long_and_clean():
    excluded = excluded_stdlib_top_levels()
    stdlib = stdlib_source_documents()
    assert len(stdlib) > 100
    assert [d.doc_id for d in stdlib] == sorted(d.doc_id for d in stdlib)
    for doc in stdlib:
        parts = doc.doc_id.split("/")
        assert doc.kind == STDLIB_KIND and len(doc.text) >= MIN_DOC_CHARS
        assert parts[1].removesuffix(".py") not in excluded
        assert not {"test", "tests", "idle_test", "site-packages"} & set(parts)
    debian = debian_doc_documents()
    assert [d.doc_id for d in debian] == sorted(d.doc_id for d in debian)
    for doc in debian:
        name = doc.doc_id.rsplit("/", 1)[-1].lower()
        assert doc.kind == DEBIAN_DOC_KIND and len(doc.text) >= MIN_DOC_CHARS
        assert not name.startswith("copyright") and "\0" not in doc.text
    assert len({d.text for d in debian}) == len(debian)  # one copy of a text shipped by several packages


def test_split_documents_is_stable_and_disjoint():
    docs = stdlib_source_documents() + debian_doc_documents()
    train, val = split_documents(docs)
    assert (train, val) == split_documents(list(docs))
    assert {d.doc_id for d in train}.isdisjoint(d.doc_id for d in val)
    assert len(train) + len(val) == len(docs)
    assert 0.05 < len(val) / len(docs) < 0.15
    # A document's side does not depend on which other documents are split with it.
    assert split_documents(val)[1] == val
    assert split_documents(docs, validation_fraction=0.0)[1] == []
    with pytest.raises(ValueError):
        split_documents(docs, validation_fraction=1.5)


def test_copy_back_asks_for_a_passage_planted_far_back():
    prompts = _make(seed=7, num_prompts=4, kinds=("copy_back",))
    assert [p.kind for p in prompts] == ["copy_back"] * 4
    for p in prompts:
        body, instruction = p.text.rsplit("\n\n", 1)
        # the passage is in the body, once, and the instruction quotes its first words
        assert p.answer and body.count(p.answer) == 1
        assert " ".join(p.answer.split()[:4]) in instruction and " ".join(p.answer.split()[:8]) not in instruction
        # the answer starts with the passage's own first eight words, whitespace and all
        assert p.answer.startswith(p.answer_prefix) and len(p.answer_prefix.split()) == 8
        assert MIN_TOKENS * 0.95 <= _count(p.text) <= MAX_TOKENS * 1.05
        assert len(set(p.doc_ids)) == len(p.doc_ids)
    assert _make(seed=7, num_prompts=4, kinds=("copy_back",)) == prompts
    # the default kinds do not include it, so "all" gives the prompts it gave before
    assert "copy_back" not in PROMPT_KINDS


def test_spec_names_extra_kinds_next_to_all():
    from flashmemory.dump.spec import build_prompts

    prompts = build_prompts(f"n=12,val=0,min={MIN_TOKENS},max={MAX_TOKENS},seed=1,kinds=all+copy_back",
                            WhitespaceTokenizer())  # fmt: skip
    assert {p.kind for p in prompts} == {*PROMPT_KINDS, "copy_back"}
    with pytest.raises(ValueError, match="unknown prompt kinds"):
        build_prompts("n=2,val=0,kinds=all+copying", WhitespaceTokenizer())


def test_answer_prefixes_reach_the_dumped_ids(tmp_path):
    import json

    from flashmemory.dump.runner import encode_chat
    from flashmemory.dump.spec import build_prompts

    from ..bench.fake_tokenizers import CharTokenizer

    path = tmp_path / "prompts.jsonl"
    path.write_text(json.dumps({"text": "abc", "answer_prefix": "xy"}) + "\n" + json.dumps({"text": "de"}) + "\n")
    with_prefix, without = build_prompts(str(path), None)
    assert (with_prefix.answer_prefix, without.answer_prefix) == ("xy", "")
    tok = CharTokenizer()  # no chat template: the prefix follows the prompt after a blank line
    assert encode_chat(tok, "abc", "xy")[0].tolist() == tok.encode("abc\n\nxy")
    assert encode_chat(tok, "abc")[0].tolist() == tok.encode("abc")
    made = build_prompts(f"n=2,val=0,min={MIN_TOKENS},max={MAX_TOKENS},seed=3,kinds=copy_back", WhitespaceTokenizer())
    assert all(p.answer_prefix and p.answer_prefix.split()[0] in p.text for p in made)
