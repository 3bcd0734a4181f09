"""LongBench-v2: the published format's loader, the prompt and scorer, and the local task's generator."""

import json
import re

import pytest

from flashmemory.bench import runner
from flashmemory.bench.longbench import (
    ANSWER_PREFIX,
    LOCAL_TASKS,
    extract_choice,
    generate_longbench,
    length_bucket,
    load_longbench,
    local_item,
    render_prompt,
    score_longbench,
)
from flashmemory.bench.longbench.prompt import QUESTION_MARKER, truncate_middle
from flashmemory.models.tiny import tiny_model
from flashmemory.runtime.stats import GenerationStats

from .data_files import load_error
from .fake_tokenizers import CharTokenizer, WordTokenizer
from .test_runner import tiny_loader


def _record(i, domain="Code Repository Understanding", answer="B", context="def f():\n    return 1\n", **kw):
    rec = {
        "_id": f"66f{i:05d}",
        "domain": domain,
        "sub_domain": "Code repo QA",
        "difficulty": "hard",
        "length": "short",
        "question": "What does f return?",
        "choice_A": "0",
        "choice_B": "1",
        "choice_C": "2",
        "choice_D": "None",
        "answer": answer,
        "context": context,
    }
    rec.update(kw)
    return rec


@pytest.fixture
def data_file(tmp_path):
    path = tmp_path / "data.json"
    records = [
        _record(0),
        _record(1, domain="Single-Document QA", difficulty="easy", length="medium", answer="D"),
        _record(2, context="Once upon a time. " * 400 + "THE END", length="long"),
    ]
    path.write_text(json.dumps(records))
    return path


@pytest.mark.parametrize(
    ("response", "letter"),
    [
        ("The correct answer is (B)", "B"),
        ("**The correct answer is (C)**", "C"),
        ("The correct answer is D, because f returns None.", "D"),
        ("The correct answer is (A) or maybe The correct answer is (B)", "A"),
        ('The correct answer is (insert answer here)".', None),
        ("I would pick (A).", None),
        ("the correct answer is (A)", None),  # LongBench-v2's patterns are case-sensitive
    ],
)
def test_extract_choice(response, letter):
    assert extract_choice(response) == letter


def test_load_longbench(data_file):
    items = load_longbench(data_file)
    assert [it.id for it in items] == ["66f00000", "66f00001", "66f00002"]
    assert [it.task for it in items] == ["code_repo", "single_doc_qa", "code_repo"]
    assert items[1].difficulty == "easy" and items[1].length == "medium" and items[1].answer == "D"
    assert items[0].choices == ("0", "1", "2", "None")
    assert items[0].to_json() == _record(0)
    prompt = render_prompt(items[0])
    assert prompt.startswith("Please read the following text and answer the question below.\n\n<text>\ndef f():")
    assert (
        "</text>\n\nWhat is the correct answer to this question: What does f return?\nChoices:\n(A) 0\n(B) 1\n"
        in prompt
    )
    assert prompt.endswith('Format your response as follows: "The correct answer is (insert answer here)".')


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "does not exist"),
        ("{not json", "is not valid JSON"),
        ('{"_id": "x"}', "must hold a JSON list of items, got dict"),
        ("[]", "holds no items"),
        (json.dumps([_record(0), {k: v for k, v in _record(1).items() if k != "choice_C"}]),
         "item 1: missing field(s) choice_C"),
        (json.dumps([_record(0, answer="E")]), "answer 'E' is not one of A, B, C, D"),
        (json.dumps([_record(0, domain="Poetry")]), "domain 'Poetry' is not one of Single-Document QA"),
        (json.dumps([_record(0, difficulty=3)]), "field(s) difficulty must be strings"),
        (json.dumps(["text"]), "item 0: expected an object"),
    ],
    ids=["missing", "not-json", "not-list", "empty", "no-field", "bad-answer", "bad-domain", "not-str", "not-object"],
)  # fmt: skip
def test_load_longbench_bad_files(tmp_path, content, message):
    assert message in load_error(load_longbench, tmp_path / "data.json", content)


def test_truncate_middle_keeps_both_ends():
    tok = WordTokenizer()
    text = "START " + " ".join(f"w{i}" for i in range(500)) + " END"
    cut, n = truncate_middle(text, tok, 101)
    assert n == len(tok.encode(cut)) <= 101 and n >= 95
    assert cut.startswith("START w0 w1") and cut.endswith("w499 END") and "w250" not in cut
    assert truncate_middle("short text", tok, 101) == ("short text", 2)


def test_generate_longbench_published(data_file):
    tok = WordTokenizer()
    samples = generate_longbench("code_repo", tok, length=600, num_samples=5, seed=0, data=data_file)
    assert [s.info["sample_id"] for s in samples] == ["66f00000", "66f00002"]  # only the domain's items
    short, long = samples
    assert short.input == render_prompt(load_longbench(data_file)[0]) + "\n\n" + ANSWER_PREFIX
    assert short.outputs == ["B"] and short.buckets == {"difficulty": "hard", "length": "short"}
    assert long.num_tokens <= 600 - 16 - len(tok.encode("\n\n" + ANSWER_PREFIX)) < 1600
    assert long.input.startswith("Please read") and "THE END" in long.input and "What does f return?" in long.input
    assert score_longbench(short, "B) 1") == 100.0 and score_longbench(short, "A)") == 0.0
    assert score_longbench(short, "") == 0.0


def test_generate_longbench_refuses_unbuilt_domain():
    with pytest.raises(ValueError, match="long_icl needs --data"):
        generate_longbench("long_icl", WordTokenizer(), length=2048, num_samples=1, seed=0)


def test_length_bucket():
    assert [length_bucket(n) for n in (2048, 4096, 8192, 16384, 32768)] == ["short"] * 2 + ["medium"] * 2 + ["long"]


@pytest.mark.parametrize("task", LOCAL_TASKS)
def test_generate_longbench_local_is_deterministic_and_fills_the_length(task):
    tok = WordTokenizer()
    first = generate_longbench(task, tok, length=2048, num_samples=2, seed=3)
    again = generate_longbench(task, tok, length=2048, num_samples=2, seed=3)
    other = generate_longbench(task, tok, length=2048, num_samples=2, seed=4)
    assert first == again and first[0].input != other[0].input
    budget = 2048 - 16 - len(tok.encode("\n\n" + ANSWER_PREFIX))
    for sample in first:
        assert 0.9 * budget <= sample.num_tokens <= budget
        assert sample.num_tokens == len(tok.encode(sample.input.removesuffix("\n\n" + ANSWER_PREFIX)))
    assert [s.buckets["difficulty"] for s in first] == ["easy", "hard"]
    for sample in first:  # the question-last protocol splits after the document, before the question
        at = sample.input.rfind(sample.question_marker)
        assert sample.question_marker == QUESTION_MARKER
        assert "</text>" in sample.input[:at] and "(D)" in sample.input[at:]


def _sections(context: str, header: str) -> dict[str, str]:
    """Text under each header line matching ``header`` (one group: the section's name)."""
    parts = re.split(rf"^{header}$", context, flags=re.M)
    return {name: body for name, body in zip(parts[1::2], parts[2::2], strict=True)}


def _quoted(question: str) -> list[str]:
    return re.findall(r'"(.+?)"(?:\n|$)', question)


def _check_docs(item):
    correct = item.choices["ABCD".index(item.answer)]
    others = [c for c in item.choices if c != correct]
    q = item.question
    if item.domain == "Single-Document QA":
        sections = _sections(item.context, r"## (\S+)")
        if q.startswith("Which entry"):
            (sentence,) = _quoted(q)
            assert sentence in sections[correct] and not any(sentence in sections[o] for o in others)
        else:
            owner = re.search(r"entry for (\S+), and", q).group(1)
            assert correct not in sections[owner] and all(o in sections[owner] for o in others)
        return
    docs = _sections(item.context, r"(Document \d+):")
    if q.startswith("Which document"):
        (passage,) = _quoted(q)
        assert passage in docs[correct] and not any(passage in docs[o] for o in others)
    else:
        p1, p2 = _quoted(q)
        a, b = correct.split(" and ")
        assert p1 in docs[a] and p2 in docs[b]


def _def_at(context: str, qualname: str) -> int:
    """Where ``qualname``'s def line is: after its class line for a method, at a line start for a function."""
    *cls, name = qualname.split(".")
    start = re.search(rf"^class {cls[0]}\b", context, re.M).start() if cls else 0
    pattern = rf"^    (async )?def {re.escape(name)}\(" if cls else rf"^(async )?def {re.escape(name)}\("
    return re.compile(pattern, re.M).search(context, start).start()


def _body(context: str, qualname: str) -> str:
    start = _def_at(context, qualname)
    end = re.compile(r"^(    )?(async )?def |^class |^### File", re.M).search(context, start + 1)
    return context[start : end.start() if end else len(context)]


def _check_code(item):
    correct = item.choices["ABCD".index(item.answer)]
    others = [c for c in item.choices if c != correct]
    q, ctx = item.question, item.context
    if q.startswith("In which file"):
        name = re.search(r"is (\S+) defined\?", q).group(1)
        files = _sections(ctx, r"### File: (\S+)")
        assert _def_at(files[correct], name) >= 0
    elif q.startswith("Which function or method has a docstring"):
        line = re.search(r'begins "(.*)"\?$', q).group(1)
        assert line in _body(ctx, correct) and not any(line in _body(ctx, o) for o in others)
    elif q.startswith("Which of these functions or methods calls"):
        callee = re.search(r"calls (\w+)\(", q).group(1)
        assert f"{callee}(" in _body(ctx, correct)
        assert not any(re.search(rf"\b{callee}\b", _body(ctx, o)) for o in others)
    else:
        assert _def_at(ctx, correct) < min(_def_at(ctx, o) for o in others)


@pytest.mark.parametrize("task", LOCAL_TASKS)
def test_local_item_answers_are_right(task):
    # The correct option is checked against the context independently of how the generator chose it.
    seen = set()
    for i in range(12):
        difficulty = ("easy", "hard")[i % 2]
        item = local_item(task, f"test:{i}", 12 + 7 * i, difficulty, "short")
        assert len(set(item.choices)) == 4 and item.difficulty == difficulty
        (_check_code if task == "code_repo" else _check_docs)(item)
        seen.add(" ".join(item.question.split(" ")[:3]))
    assert len(seen) >= 2  # more than one kind of question is asked


# ------------------------------------------------------------------------------------------ through the runner


class ScriptedMethod:
    """Answers every prompt with the same text; counts its calls (the runner's scoring and resume are tested)."""

    kv_note = "scripted"

    def __init__(self, name, text):
        self.name, self.text, self.calls = name, text, 0

    def run(self, model, tokenizer, input_ids, attention_mask, max_new_tokens, lsa, followup=None):
        self.calls += 1
        self.followup = followup
        stats = GenerationStats("full", 1, input_ids.shape[1], len(self.text), kv_bytes_device=50, kv_bytes_full=100)
        return [tokenizer.encode(self.text)], stats


@pytest.fixture
def scripted_bench(monkeypatch, tmp_path):
    methods = {"full": ScriptedMethod("full", "B) because f returns 1"), "lsa": ScriptedMethod("lsa", "nothing")}
    monkeypatch.setattr(runner, "get_method", lambda name, seed=0: methods[name])
    model = tiny_model("llama", vocab_size=256)

    def call(taskset, **kw):
        args = dict(lengths=[1024], methods=["full", "lsa"], samples=4, out=tmp_path / "run", budget=0.5, seed=0,
                    device="cpu", progress=False, load=lambda name, device: (model, CharTokenizer()))  # fmt: skip
        args.update(kw)
        return runner.run_bench(taskset, "tiny", **args)

    return call, methods


def test_bench_longbench_published(scripted_bench, data_file, tmp_path):
    bench, methods = scripted_bench
    summary = bench("longbench-v2:code_repo,single_doc_qa", data=data_file)
    rows = [json.loads(line) for line in (tmp_path / "run" / "results.jsonl").read_text().splitlines()]
    full = {(r["task"], r["sample"]): r for r in rows if r["method"] == "full"}
    assert sorted(full) == [("code_repo", 0), ("code_repo", 1), ("single_doc_qa", 0)]
    # Answers B, B and D: "The correct answer is (B) ..." is right twice, and "nothing" never is.
    assert [full[k]["score"] for k in sorted(full)] == [100.0, 100.0, 0.0]
    assert all(r["score"] == 0.0 for r in rows if r["method"] == "lsa")
    assert full["code_repo", 1]["info"]["sample_id"] == "66f00002"
    assert full["code_repo", 1]["buckets"] == {"difficulty": "hard", "length": "long"}
    assert full["code_repo", 1]["prompt_tokens"] + 16 <= 1024 < len(render_prompt(load_longbench(data_file)[2]))
    buckets = {(c["method"], c["bucket"]): c for c in summary["per_bucket"]}
    assert buckets["full", "difficulty=hard"]["score"] == 100.0 and buckets["full", "difficulty=easy"]["score"] == 0
    assert buckets["full", "length=long"]["samples"] == 1
    assert "| difficulty=hard (2) | 100.00 | 0.00 |" in (tmp_path / "run" / "summary.md").read_text()
    calls = methods["full"].calls
    bench("longbench-v2:code_repo,single_doc_qa", data=data_file)
    assert methods["full"].calls == calls  # a rerun reuses every finished row


def test_bench_workers_skip_the_items_published_data_lacks(data_file, tmp_path):
    """Workers make their own prompts; an index past the data's items is reported back, not decoded or planned."""
    summary = runner.run_bench("longbench-v2:code_repo,single_doc_qa", "tiny", lengths=[1024], methods=["full"],
                               samples=4, out=tmp_path / "w", budget=0.5, seed=0, device="cpu", progress=False,
                               load=tiny_loader, data=data_file, workers=2)  # fmt: skip
    rows = [json.loads(line) for line in (tmp_path / "w" / "results.jsonl").read_text().splitlines()]
    assert sorted((r["task"], r["sample"]) for r in rows) == [("code_repo", 0), ("code_repo", 1), ("single_doc_qa", 0)]
    assert summary["complete"] and summary["rows"]["planned"] == 3
    assert rows[0]["prompt_tokens"] <= 1024


def test_bench_refuses_bad_data(scripted_bench, tmp_path, data_file):
    bench, _ = scripted_bench

    def no_model(name, device):
        raise AssertionError("loaded the model before checking the data file")

    with pytest.raises(FileNotFoundError, match="does not exist"):
        bench("longbench-v2", data=tmp_path / "nope.json", load=no_model)
    with pytest.raises(ValueError, match="--data is for the tasksets longbench-v2, longmemeval, not ruler"):
        bench("ruler", data=data_file, load=no_model)
    with pytest.raises(ValueError, match="unknown longbench-v2 task.s. long_icl; valid tasks: single_doc_qa"):
        bench("longbench-v2:long_icl", load=no_model)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["longbench-v2", "--data", "{missing}"], "does not exist"),
        (["longmemeval", "--data", "{bad}"], "is not valid JSON"),
        (["ruler", "--data", "{bad}"], "--data is for the tasksets longbench-v2, longmemeval, not ruler"),
        (["longbench-v2:structured_data"], "unknown longbench-v2 task(s) structured_data"),
    ],
)
def test_cli_bench_refuses_bad_data(tmp_path, args, message):
    from typer.testing import CliRunner

    from flashmemory.cli.app import app

    (tmp_path / "bad.json").write_text("[{")
    paths = {"missing": tmp_path / "nope.json", "bad": tmp_path / "bad.json"}
    args = [a.format(**paths) for a in args]
    res = CliRunner().invoke(app, ["bench", *args, "--out", str(tmp_path / "out"), "--device", "cpu"])
    assert res.exit_code == 2 and message in " ".join(res.output.split()), res.output


def test_bench_question_last_sends_the_question_as_a_second_turn(scripted_bench, data_file, tmp_path):
    bench, methods = scripted_bench
    summary = bench("longbench-v2:code_repo", data=data_file, protocol="question-last", out=tmp_path / "ql")
    assert summary["config"]["protocol"] == "question-last"
    turn = CharTokenizer().decode(methods["full"].followup[0].tolist())
    assert turn.startswith(QUESTION_MARKER) and turn.endswith(ANSWER_PREFIX)
    rows = [json.loads(line) for line in (tmp_path / "ql" / "results.jsonl").read_text().splitlines()]
    single = bench("longbench-v2:code_repo", data=data_file, out=tmp_path / "one")
    assert methods["full"].followup is None and single["config"]["protocol"] == "single-prefill"
    one = [json.loads(line) for line in (tmp_path / "one" / "results.jsonl").read_text().splitlines()]
    assert [r["prompt_tokens"] for r in rows] == [r["prompt_tokens"] for r in one]  # the same tokens, split
    with pytest.raises(ValueError, match="holds results of another run"):
        bench("longbench-v2:code_repo", data=data_file, out=tmp_path / "one", protocol="question-last")
