"""``flashmemory ask`` on a tiny model: the context is tokenised once per question, and a context too short for
LSA's default budget is answered with full attention (a budget the user gives is held to)."""

import json

import pytest
import torch
from typer.testing import CliRunner

from flashmemory.cli import app
from flashmemory.config import LSAConfig
from flashmemory.memory.layout import BudgetError
from flashmemory.models.tiny import tiny_model
from flashmemory.runtime import ask as ask_module
from flashmemory.runtime.ask import ask_questions
from flashmemory.runtime.generate import generate
from flashmemory.runtime.session import Session, build_prompt

from ..bench.fake_tokenizers import BatchCharTokenizer
from ..conftest import SMALL_LSA

LONG = "".join(chr(97 + (i * 5) % 26) for i in range(900))
SHORT = "the code is 42"


class CountingTokenizer(BatchCharTokenizer):
    """Counts the calls that tokenise a text holding ``marker`` (the context)."""

    def __init__(self, marker: str):
        super().__init__(chat_template="tiny")
        self.marker, self.calls = marker, 0

    def __call__(self, text, **kw):
        texts = [text] if isinstance(text, str) else text
        self.calls += sum(self.marker in t for t in texts)
        return super().__call__(text, **kw)


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama")


def _loaded(monkeypatch, model, tok):
    monkeypatch.setattr(ask_module, "load_on", lambda *a, **k: (model, tok))


def _file(tmp_path, text):
    path = tmp_path / "context.txt"
    path.write_text(text)
    return path


@pytest.mark.parametrize("questions", [["which letter?"], ["which letter?", "what comes last?", "and first?"]])
def test_the_context_is_tokenised_once_per_question_and_twice_for_a_session(tmp_path, monkeypatch, model, questions):
    tok = CountingTokenizer(LONG[:200])
    _loaded(monkeypatch, model, tok)
    lsa = LSAConfig(budget=0.5, **SMALL_LSA)
    got = ask_questions("tiny", _file(tmp_path, LONG), questions, lsa=lsa, max_new_tokens=6, indexer="zero-shot")
    # each question's prompt once (checked, then answered); a session adds the context's prefix and its length
    assert tok.calls == len(questions) + (2 if len(questions) > 1 else 0)
    want = [
        generate(model, BatchCharTokenizer("tiny"), build_prompt(LONG, q), lsa=lsa, max_new_tokens=6, indexer=None)
        for q in questions
    ]
    assert [r["answer"] for r in got] == [w.text.strip() for w in want]
    assert all(r["method"] == "lsa" for r in got)


@pytest.mark.parametrize("questions", [["what is the code?"], ["what is the code?", "which code?"]])
def test_a_context_too_short_for_the_default_budget_is_answered_with_full_attention(
    tmp_path, monkeypatch, model, questions
):
    tok = BatchCharTokenizer(chat_template="tiny")
    _loaded(monkeypatch, model, tok)
    path = _file(tmp_path, SHORT)
    got = ask_questions("tiny", path, questions, max_new_tokens=5)
    full = ask_questions("tiny", path, questions, method="full", max_new_tokens=5)
    assert [r["method"] for r in got] == ["full"] * len(questions)
    assert [r["answer"] for r in got] == [r["answer"] for r in full]
    # the same budget, given: held to
    with pytest.raises(BudgetError, match="cannot hold the always-resident part"):
        ask_questions("tiny", path, questions, lsa=LSAConfig(), max_new_tokens=5)
    with pytest.raises(BudgetError):
        ask_questions("tiny", path, questions, max_new_tokens=5, budget_given=True)


def test_the_cli_says_when_it_answered_with_full_attention_and_refuses_a_given_budget(tmp_path, monkeypatch, model):
    _loaded(monkeypatch, model, BatchCharTokenizer(chat_template="tiny"))
    args = ["ask", "-c", str(_file(tmp_path, SHORT)), "-q", "what is the code?", "--device", "cpu", "--json"]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    assert "answered with full attention" in res.stderr and '"method": "full"' in res.stdout
    res = CliRunner().invoke(app, [*args, "--budget", "0.25"])
    assert res.exit_code != 0 and "cannot hold the always-resident part" in res.output
    assert "Traceback" not in res.output


def test_a_prompt_handed_to_a_session_must_be_one_row(model):
    tok = BatchCharTokenizer(chat_template="tiny")
    session = Session(model, tok, LONG, method="full")
    with pytest.raises(ValueError, match=r"shaped \[1, T\]"):
        session.ask("which letter?", prompt_ids=torch.zeros(2, 5, dtype=torch.long))


def test_the_context_may_come_on_standard_input(tmp_path, monkeypatch, model):
    _loaded(monkeypatch, model, BatchCharTokenizer(chat_template="tiny"))
    args = ["-q", "which letter?", "--device", "cpu", "--json", "--method", "full"]
    piped = CliRunner().invoke(app, ["ask", "-c", "-", *args], input=LONG)
    from_file = CliRunner().invoke(app, ["ask", "-c", str(_file(tmp_path, LONG)), *args])
    assert piped.exit_code == 0 and from_file.exit_code == 0, piped.output
    same = ("answer", "context_tokens", "new_tokens", "kv_bytes_device")
    got, want = json.loads(piped.stdout), json.loads(from_file.stdout)
    assert {k: got[k] for k in same} == {k: want[k] for k in same}
    empty = CliRunner().invoke(app, ["ask", "-c", "-", *args], input="  \n")
    assert empty.exit_code == 2 and "standard input is empty" in empty.output


@pytest.mark.parametrize("questions", [["which letter?"], ["which letter?", "what comes last?"]])
def test_answers_are_shown_as_they_are_decoded(tmp_path, monkeypatch, model, questions):
    _loaded(monkeypatch, model, BatchCharTokenizer(chat_template="tiny"))
    pieces = {i: [] for i in range(len(questions))}
    lsa = LSAConfig(budget=0.5, **SMALL_LSA)
    got = ask_questions(
        "tiny", _file(tmp_path, LONG), questions, lsa=lsa, max_new_tokens=8, on_text=lambda i, p: pieces[i].append(p)
    )
    assert all(len(pieces[i]) > 1 for i in pieces)  # piece by piece, not whole at the end
    assert ["".join(pieces[i]).strip() for i in pieces] == [r["answer"] for r in got]
    args = ["ask", "-c", str(_file(tmp_path, LONG)), "--device", "cpu", "--budget", "0.5", "--max-new-tokens", "8"]
    args += [a for q in questions for a in ("-q", q)]
    streamed = CliRunner().invoke(app, [*args, "--stream"])
    whole = CliRunner().invoke(app, [*args, "--no-stream"])
    assert streamed.exit_code == 0 and whole.exit_code == 0, streamed.output
    shown = [line for line in streamed.stdout.splitlines() if line.startswith("answer: ")]
    assert shown == [line for line in whole.stdout.splitlines() if line.startswith("answer: ")]
    assert len(shown) == len(questions)


def test_questions_piped_in_are_answered_as_they_come_as_if_given_with_q(tmp_path, monkeypatch, model):
    _loaded(monkeypatch, model, BatchCharTokenizer(chat_template="tiny"))
    path = str(_file(tmp_path, LONG))
    args = ["ask", "-c", path, "--device", "cpu", "--budget", "0.5", "--max-new-tokens", "6", "--json"]
    piped = CliRunner().invoke(app, args, input="which letter?\n\n  \nwhat comes last?\n")
    given = CliRunner().invoke(app, [*args, "-q", "which letter?", "-q", "what comes last?"])
    assert piped.exit_code == 0 and given.exit_code == 0, piped.output
    got = [json.loads(line) for line in piped.stdout.splitlines()]
    want = [json.loads(line) for line in given.stdout.splitlines()]
    assert [(r["question"], r["answer"]) for r in got] == [(r["question"], r["answer"]) for r in want]
    text = CliRunner().invoke(app, args[:-1] + ["--no-stream"], input="which letter?\nwhat comes last?\n")
    assert text.stdout.count("question: ") == 2 and text.stdout.count("answer: ") == 2
    no_questions = CliRunner().invoke(app, ["ask", "-c", "-", "--device", "cpu"], input=LONG)
    assert no_questions.exit_code == 2 and "give --question" in no_questions.output


def test_a_question_that_cannot_be_answered_is_reported_and_the_next_one_answered(tmp_path, monkeypatch, model):
    from flashmemory.runtime.ask import ask_as_they_come

    tok = CountingTokenizer(LONG[:200])
    _loaded(monkeypatch, model, tok)
    refused = []
    too_long = "why " * 2100  # the prompt would pass the tiny model's 8192-token window
    records = ask_as_they_come(
        "tiny",
        _file(tmp_path, LONG),
        iter(["which letter?", too_long, "what comes last?"]),
        lsa=LSAConfig(budget=0.5, **SMALL_LSA),
        max_new_tokens=6,
        on_refused=lambda q, message: refused.append((q, message)),
    )
    first = next(records)
    assert first["question"] == "which letter?" and tok.calls == 3  # the session's two passes, then the question's
    rest = list(records)
    assert [r["question"] for r in rest] == ["what comes last?"]
    assert refused and refused[0][0] == too_long and "handles at most 8192" in refused[0][1]
    # without somewhere to report it, the refusal is raised
    with pytest.raises(ValueError, match="handles at most"):
        list(ask_as_they_come("tiny", _file(tmp_path, LONG), iter([too_long]), max_new_tokens=6))


def test_the_demo_refuses_a_budget_lsa_cannot_keep_before_full_attention_answers(monkeypatch, model):
    from flashmemory.cli import demo as demo_module

    class Sized(BatchCharTokenizer):  # a plain string is one row of ids, as a Hugging Face tokenizer gives it
        def __call__(self, text, **kw):
            out = super().__call__(text, **kw)
            return out if isinstance(text, list) or kw.get("return_tensors") else {"input_ids": self._encode(text)}

    tok = Sized(chat_template="tiny")
    monkeypatch.setattr(demo_module, "load_on", lambda *a, **k: (model, tok))
    methods = []
    real = demo_module.generate_encoded
    monkeypatch.setattr(demo_module, "generate_encoded", lambda *a, **k: methods.append(k["method"]) or real(*a, **k))
    with pytest.raises(BudgetError, match="cannot hold the always-resident part"):
        demo_module.run_demo("tiny", context_tokens=300, lsa=LSAConfig(), seed=0, device="cpu", indexer="zero-shot")
    assert methods == ["lsa"]  # nothing computed and thrown away
    got = demo_module.run_demo(
        "tiny", context_tokens=600, lsa=LSAConfig(budget=0.6, **SMALL_LSA), seed=0, device="cpu", indexer="zero-shot"
    )
    assert [row["method"] for row in got["rows"]] == ["full", "lsa"]


def test_each_record_goes_out_as_soon_as_its_answer_is_whole(tmp_path, monkeypatch, model):
    _loaded(monkeypatch, model, BatchCharTokenizer(chat_template="tiny"))
    real, calls = ask_module.AnsweringSession.ask, []

    def fails_second(self, *a, **k):
        calls.append(1)
        if len(calls) == 2:
            raise MemoryError("the host cannot hold this")
        return real(self, *a, **k)

    monkeypatch.setattr(ask_module.AnsweringSession, "ask", fails_second)
    args = ["ask", "-c", str(_file(tmp_path, LONG)), "--device", "cpu", "--budget", "0.5", "--json"]
    res = CliRunner().invoke(app, [*args, "-q", "which letter?", "-q", "what comes last?"])
    assert res.exit_code != 0 and "cannot hold" in res.output
    assert json.loads(res.stdout.splitlines()[0])["question"] == "which letter?"  # the first answer was kept
