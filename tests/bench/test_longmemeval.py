"""LongMemEval: the published format's loader, the rule-based scorer, the prompt and the local generator."""

import datetime as dt
import json
import re

import pytest

from flashmemory.bench import runner
from flashmemory.bench.longmemeval import (
    LONGMEMEVAL_TASKS,
    fit_history,
    generate_longmemeval,
    is_refusal,
    load_longmemeval,
    local_item,
    matches,
    normalize,
    render_prompt,
    score_answer,
)
from flashmemory.models.tiny import tiny_model
from flashmemory.runtime.stats import GenerationStats

from .data_files import load_error
from .fake_tokenizers import CharTokenizer, WordTokenizer


def _turns(*texts, answer_at=None):
    return [{"role": ("user", "assistant")[i % 2], "content": t, **({"has_answer": True} if i == answer_at else {})}
            for i, t in enumerate(texts)]  # fmt: skip


def _record(qid="q1", qtype="single-session-user", answer="Studio Halcyon", **kw):
    rec = {
        "question_id": qid,
        "question_type": qtype,
        "question": "Where did I sign up for a jazz piano class?",
        "answer": answer,
        "question_date": "2023/05/30 (Tue) 23:40",
        "haystack_session_ids": ["s_b", "answer_a", "s_c"],
        # Out of order on purpose: the prompt sorts sessions by date, as LongMemEval's reader does.
        "haystack_dates": ["2023/05/22 (Mon) 09:00", "2023/05/20 (Sat) 02:21", "2023/05/25 (Thu) 18:30"],
        "haystack_sessions": [
            _turns("How do I boil an egg?", "Put it in boiling water for nine minutes."),
            _turns("I signed up for a jazz piano class at Studio Halcyon.", "Sounds fun!", answer_at=0),
            _turns("Any tips for sleeping better? " * 20, "Keep a regular schedule. " * 20),
        ],
        "answer_session_ids": ["answer_a"],
    }
    rec.update(kw)
    return rec


@pytest.fixture
def data_file(tmp_path):
    path = tmp_path / "longmemeval_s.json"
    records = [_record(), _record("q2_abs", answer="You did not mention a podcast."),
               _record("q3", "temporal-reasoning", answer=10)]  # fmt: skip
    path.write_text(json.dumps(records))
    return path


def test_normalize_and_match():
    assert normalize("The rent is 1,450 Euros!") == ["rent", "is", "1450", "euros"]
    assert normalize("It's twelve days, an épée") == ["its", "12", "days", "epee"]
    assert matches("It takes about twelve days.", "12 days")
    assert not matches("15 days", "5 days")  # whole words only
    assert matches("You signed up at Studio Halcyon, I think.", "Studio Halcyon")
    assert not matches("Halcyon", "Studio Halcyon")
    assert matches("10 days\n\n### Session 7:\nSession Date: 2023/09/10 (Tue) 15:02", "10 days")
    assert not matches("Session Date: 2023/09/10 (Tue) 15:02", "10")  # a copied timestamp is not an answer
    # A long reference counts as found when 80% of its distinct words are there.
    ref = "the user would prefer quiet cafes with good coffee and fast wifi"
    assert matches("They prefer quiet cafes with good coffee and wifi that is fast.", ref)
    assert not matches("They like coffee.", ref)


@pytest.mark.parametrize(
    ("prediction", "refusal"),
    [
        ("I don't know.", True),
        ("You didn't mention a podcast in our chats.", True),
        ("The information provided is not enough to answer.", True),
        ("There is no information about an upstairs neighbour.", True),
        ("You haven’t told me that.", True),
        ("Northgate Library", False),
        ("You mentioned Studio Halcyon.", False),
    ],
)
def test_is_refusal(prediction, refusal):
    assert is_refusal(prediction) is refusal


def test_score_answer():
    assert score_answer("Studio Halcyon", ["Studio Halcyon"], abstention=False) == 100.0
    assert score_answer("At the Copperleaf Studio.", ["Studio Halcyon"], abstention=False) == 0.0
    assert score_answer("Not sure, maybe Studio Halcyon?", ["Studio Halcyon"], abstention=False) == 0.0
    assert score_answer("18", ["every 18 days", "18 days", "18"], abstention=False) == 100.0
    assert score_answer("You never mentioned a podcast.", ["x"], abstention=True) == 100.0
    assert score_answer("The Salt Orchard", ["x"], abstention=True) == 0.0


def test_load_longmemeval(data_file):
    items = load_longmemeval(data_file)
    assert [it.task for it in items] == ["information_extraction", "abstention", "temporal_reasoning"]
    assert items[1].is_abstention and not items[0].is_abstention
    assert items[2].answer == "10" and items[0].to_json() == _record()
    prompt = render_prompt(items[0])
    assert prompt.startswith(
        "I will give you several history chats between you and a user. Please answer the "
        "question based on the relevant chat history.\n\n\nHistory Chats:\n\n\n### Session 1:\n"
        "Session Date: 2023/05/20 (Sat) 02:21\nSession Content:\n\n\nuser: I signed up"
    )
    assert prompt.index("### Session 2:\nSession Date: 2023/05/22") < prompt.index(
        "### Session 3:\nSession Date: 2023/05/25"
    )
    assert "has_answer" not in prompt
    assert prompt.endswith("\n\nCurrent Date: 2023/05/30 (Tue) 23:40\nQuestion: Where did I sign up for a jazz piano "
                           "class?\nAnswer:")  # fmt: skip


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "does not exist"),
        ("[{]", "is not valid JSON"),
        ("{}", "must hold a JSON list of items, got dict"),
        ("[]", "holds no items"),
        (json.dumps([{k: v for k, v in _record().items() if k != "haystack_dates"}]),
         "missing field(s) haystack_dates"),
        (json.dumps([_record(qtype="trivia")]), "question_type 'trivia' is not one of single-session-user"),
        (json.dumps([_record(haystack_session_ids=["a"])]), "differ in length"),
        (json.dumps([_record(haystack_sessions=[[{"role": "bot", "content": "x"}], [], []])]),
         "session 0, turn 0: a turn needs a role (user or assistant)"),
        (json.dumps([_record(answer=None)]), "answer must be a string or a number"),
    ],
    ids=["missing", "not-json", "not-list", "empty", "no-field", "bad-type", "ragged", "bad-role", "no-answer"],
)  # fmt: skip
def test_load_longmemeval_bad_files(tmp_path, content, message):
    assert message in load_error(load_longmemeval, tmp_path / "data.json", content)


def test_fit_history_drops_oldest_sessions(data_file):
    item = load_longmemeval(data_file)[0]
    tok = WordTokenizer()
    count = lambda text: len(tok.encode(text))  # noqa: E731
    full = count(render_prompt(item))
    text, n, kept = fit_history(item, count, full)
    assert kept == [1, 0, 2] and n == full
    text, n, kept = fit_history(item, count, full - 5)
    assert kept == [0, 2] and n == count(text) <= full - 5  # the oldest (the evidence) went first
    assert "Studio Halcyon" not in text and "### Session 1:\nSession Date: 2023/05/22" in text
    with pytest.raises(ValueError, match="alone needs"):
        fit_history(item, count, 10)


def test_generate_longmemeval_published(data_file):
    tok = WordTokenizer()
    (sample,) = generate_longmemeval("information_extraction", tok, length=4096, num_samples=3, seed=0, data=data_file)
    assert sample.outputs == ["Studio Halcyon"] and sample.answer_prefix == ""
    assert sample.info["sessions_dropped"] == 0 and sample.buckets == {"question_type": "single-session-user"}
    length = len(tok.encode(render_prompt(load_longmemeval(data_file)[0]))) + 32 - 5
    short = generate_longmemeval("information_extraction", tok, length=length, num_samples=1, seed=0, data=data_file)
    assert short[0].info["sessions_dropped"] == 1 and short[0].info["evidence_dropped"] == 1
    assert short[0].num_tokens <= length - 32
    (abs_sample,) = generate_longmemeval("abstention", tok, length=4096, num_samples=1, seed=0, data=data_file)
    assert abs_sample.buckets == {"question_type": "single-session-user_abs"}


def _parse_date(text):
    return dt.datetime.strptime(text[:10], "%Y/%m/%d").date()


def _evidence(item):
    """(date, text) of every evidence turn, in date order."""
    out = []
    for date, session in zip(item.dates, item.sessions, strict=True):
        out += [(_parse_date(date), t["content"]) for t in session if t.get("has_answer")]
    return sorted(out)


def _check(task, item, answers):
    evidence = _evidence(item)
    history = " ".join(t["content"] for s in item.sessions for t in s)
    if task == "information_extraction":
        assert len(evidence) == 1 and answers[0].removeprefix("every ") in evidence[0][1]
    elif task == "multi_session":
        assert int(answers[0]) == sum(int(re.search(r"\d+", text).group()) for _, text in evidence)
    elif task == "knowledge_update":
        (_, old), (_, new) = evidence
        value = answers[0].split()[0]
        assert value in new and value not in old
    elif task == "temporal_reasoning":
        days = int(answers[0].split()[0])
        today = _parse_date(item.question_date)
        ends = (evidence[0][0], today) if "ago" in item.question else (evidence[0][0], evidence[1][0])
        assert days == (ends[1] - ends[0]).days > 0
    else:
        assert item.question_id.endswith("_abs") and len(evidence) == 1
        asked = set(normalize(item.question)) - set(normalize(history)) - {"what", "where", "which"}
        assert asked, "an abstention question must ask about something the history never mentions"
    assert set(item.answer_session_ids) == {s for s, ss in zip(item.session_ids, item.sessions, strict=True)
                                            if any(t.get("has_answer") for t in ss)}  # fmt: skip
    assert list(item.dates) == sorted(item.dates) and item.question_date > item.dates[-1]


@pytest.mark.parametrize("task", LONGMEMEVAL_TASKS)
def test_local_item_answers_are_right(task):
    for i in range(8):
        item, answers = local_item(task, f"test:{i}", 3 + 5 * i)
        assert local_item(task, f"test:{i}", 3 + 5 * i) == (item, answers)
        assert item.task == task
        _check(task, item, answers)


def test_generate_longmemeval_local_is_deterministic_and_fills_the_length():
    tok = WordTokenizer()
    first = generate_longmemeval("knowledge_update", tok, length=2048, num_samples=2, seed=5)
    assert first == generate_longmemeval("knowledge_update", tok, length=2048, num_samples=2, seed=5)
    assert first[0].input != generate_longmemeval("knowledge_update", tok, length=2048, num_samples=1, seed=6)[0].input
    for sample in first:  # the question-last protocol splits after the history, before the date and question
        at = sample.input.rfind(sample.question_marker)
        assert "History Chats:" in sample.input[:at] and "\nQuestion: " in sample.input[at:]
    for sample in first:
        assert 0.9 * (2048 - 32) <= sample.num_tokens <= 2048 - 32
        assert sample.info["sessions_dropped"] == 0 and sample.info["sessions"] >= 5
    with pytest.raises(ValueError, match="unknown LongMemEval task 'preference'"):
        generate_longmemeval("preference", tok, length=2048, num_samples=1, seed=0)


def test_bench_longmemeval_local(monkeypatch, tmp_path):
    """The local generator through the runner, with a method that always refuses: only abstention scores."""

    class Refuser:
        name, kv_note = "full", "scripted"

        def run(self, model, tokenizer, input_ids, attention_mask, max_new_tokens, lsa, followup=None):
            stats = GenerationStats("full", 1, input_ids.shape[1], 4, kv_bytes_device=100, kv_bytes_full=100)
            return [tokenizer.encode("I don't know.")], stats

    monkeypatch.setattr(runner, "get_method", lambda name, seed=0: Refuser())
    model = tiny_model("llama", vocab_size=256)
    summary = runner.run_bench("longmemeval", "tiny", lengths=[2048], methods=["full"], samples=1, out=tmp_path,
                               budget=0.5, seed=0, device="cpu", progress=False,
                               load=lambda name, device: (model, CharTokenizer()))  # fmt: skip
    rows = {r["task"]: r for r in map(json.loads, (tmp_path / "results.jsonl").read_text().splitlines())}
    assert sorted(rows) == sorted(LONGMEMEVAL_TASKS)
    assert {t: r["score"] for t, r in rows.items()} == {t: 100.0 * (t == "abstention") for t in LONGMEMEVAL_TASKS}
    assert all(500 < r["prompt_tokens"] <= 2048 - 32 for r in rows.values())
    assert rows["abstention"]["info"]["sample_id"].endswith("_abs")
    assert rows["multi_session"]["buckets"] == {"question_type": "multi-session"}
    assert {c["bucket"] for c in summary["per_bucket"]} >= {
        "question_type=multi-session",
        "question_type=knowledge-update",
    }
