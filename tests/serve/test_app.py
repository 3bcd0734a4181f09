"""The HTTP server on a tiny random model: OpenAI-shaped answers, LSA accounting, one clear error per bad request."""

import time
from pathlib import Path

import pytest
import torch

pytest.importorskip("fastapi", reason="pip install 'flashmemory[serve]'")
from fastapi.testclient import TestClient  # noqa: E402

from flashmemory.config import LSAConfig  # noqa: E402
from flashmemory.models.tiny import tiny_model  # noqa: E402
from flashmemory.runtime.generate import generate  # noqa: E402
from flashmemory.runtime.session import build_prompt  # noqa: E402
from flashmemory.serve import Engine, create_app  # noqa: E402
from flashmemory.serve.schemas import LSAChoice  # noqa: E402

from ..bench.fake_tokenizers import BatchCharTokenizer  # noqa: E402
from ..conftest import SMALL_LSA  # noqa: E402

LSA = LSAConfig(budget=0.5, **SMALL_LSA)
CONTEXT = "".join(chr(97 + (i * 7) % 26) for i in range(700))


@pytest.fixture(scope="module")
def served():
    model = tiny_model("llama")
    tok = BatchCharTokenizer(chat_template="tiny")
    engine = Engine(model, tok, "tiny", lsa=LSA, indexer=None, max_new_tokens=40)
    with TestClient(create_app(engine)) as client:
        yield client, model, tok


def test_health_and_models(served):
    client, _, _ = served
    health = client.get("/health").json()
    assert health["status"] == "ok" and health["model"] == "tiny" and health["budget"] == 0.5
    assert health["context_window"] == 8192
    assert client.get("/v1/models").json()["data"][0]["id"] == "tiny"


def test_health_reports_the_page_locked_host_memory_of_the_mirror_pool(served, monkeypatch):
    from flashmemory.memory.pinned import PinnedPool

    client, _, _ = served
    pool = PinnedPool(register=lambda data: 0, unregister=lambda data: None)
    monkeypatch.setattr("flashmemory.serve.app.HOST_POOL", pool)
    held = pool.lease(3000, torch.device("cpu"))
    pool.lease(1000, torch.device("cpu")).release()
    health = client.get("/health").json()
    assert health["host_locked_bytes"] == 4000 and health["host_free_bytes"] == 1000
    held.release()


def test_a_request_whose_kv_history_the_host_cannot_hold_gets_503_and_the_server_goes_on(served, monkeypatch):
    from flashmemory.memory.pinned import PinnedPool

    client, _, _ = served
    body = {"context": CONTEXT, "question": "which letter?", "max_new_tokens": 5}

    def no_room(self, *args, **kwargs):
        raise PinnedPool()._no_memory(96 << 30)

    with monkeypatch.context() as patch:
        patch.setattr("flashmemory.memory.store.KVStore.allocate", no_room)
        got = client.post("/v1/ask", json=body)
    assert got.status_code == 503
    assert "96.00 GiB of page-locked host memory" in got.json()["error"]["message"]
    assert client.post("/v1/ask", json=body).status_code == 200


@pytest.mark.parametrize("method", ["lsa", "full"])
def test_several_questions_share_one_prefill_and_get_the_answers_they_get_alone(served, method):
    client, _, _ = served
    questions = ["which letter?", "what comes last?", "which letter?"]
    body = {"context": CONTEXT, "questions": questions, "max_new_tokens": 12, "method": method}
    got = client.post("/v1/ask", json=body)
    assert got.status_code == 200, got.text
    answers = got.json()["answers"]
    assert [a["question"] for a in answers] == questions
    for q, a in zip(questions, answers, strict=True):
        alone = client.post("/v1/ask", json={"context": CONTEXT, "question": q, "max_new_tokens": 12, "method": method})
        alone = alone.json()
        assert a["answer"] == alone["answer"] and a["new_tokens"] == alone["new_tokens"]
        assert a["pages_recalled"] == alone["pages_recalled"]
        assert a["kv_bytes_device"] == alone["kv_bytes_device"] and a["context_tokens"] == alone["context_tokens"]
    assert answers[0]["prefill_seconds"] > answers[1]["prefill_seconds"]  # the first pays the context's prefill


def test_several_questions_tokenise_the_context_once_each_plus_the_sessions_two(served, monkeypatch):
    client, _, tok = served
    calls = []
    real = type(tok).__call__

    def counting(self, text, **kw):
        calls.extend(t for t in ([text] if isinstance(text, str) else text) if CONTEXT in t)
        return real(self, text, **kw)

    monkeypatch.setattr(type(tok), "__call__", counting)
    questions = ["which letter?", "what comes last?", "and first?"]
    got = client.post("/v1/ask", json={"context": CONTEXT, "questions": questions, "max_new_tokens": 4})
    assert got.status_code == 200, got.text
    # each prompt once, checked and then answered; the session's context prefix and its length once each
    assert len(calls) == len(questions) + 2


def test_a_server_with_a_host_cache_cap_trims_the_pool_after_each_request(monkeypatch):
    from flashmemory.memory.pinned import PinnedPool

    pool = PinnedPool(register=lambda data: 0, unregister=lambda data: None)
    monkeypatch.setattr("flashmemory.serve.engine.HOST_POOL", pool)
    pool.lease(6000, torch.device("cpu")).release()  # a long request's mirror, kept locked for reuse
    pool.lease(500, torch.device("cpu")).release()
    engine = Engine(
        tiny_model("llama"), BatchCharTokenizer(chat_template="tiny"), "tiny", lsa=LSA, host_cache_bytes=1000
    )
    body = {"context": CONTEXT, "question": "which?", "max_new_tokens": 4}
    with TestClient(create_app(engine)) as client:
        assert client.post("/v1/ask", json=body).status_code == 200
    deadline = time.monotonic() + 30
    while engine.busy and time.monotonic() < deadline:  # the answer goes out before the pool is trimmed
        time.sleep(0.01)
    assert pool.free_bytes == 500 and pool.locked_bytes == 500


def test_serve_refuses_a_negative_host_cache():
    from typer.testing import CliRunner

    from flashmemory.cli import app

    out = CliRunner().invoke(app, ["serve", "--host-cache-gib", "-1"])
    assert out.exit_code == 2 and "--host-cache-gib must be >= 0" in out.output


def test_a_server_with_a_kv_cache_reads_a_context_it_saved_for_an_earlier_request(tmp_path):
    model = tiny_model("llama")
    tok = BatchCharTokenizer(chat_template="tiny")
    engine = Engine(model, tok, "tiny", lsa=LSA, indexer=None, max_new_tokens=40, kv_cache=tmp_path)
    body = {"context": CONTEXT, "questions": ["which letter?", "what comes last?"], "max_new_tokens": 8}
    with TestClient(create_app(engine)) as client:
        first = client.post("/v1/ask", json=body).json()
        again = client.post("/v1/ask", json=body).json()
    assert [p.name for p in tmp_path.iterdir()] == [Path(first["context_kv"]["folder"]).name]
    assert not first["context_kv"]["loaded"] and again["context_kv"]["loaded"]
    assert [a["answer"] for a in again["answers"]] == [a["answer"] for a in first["answers"]]
    # one question about a saved context is read from the folder too, and answered as it is among several
    with TestClient(create_app(engine)) as client:
        one = client.post("/v1/ask", json={"context": CONTEXT, "question": "what comes last?", "max_new_tokens": 8})
    assert one.status_code == 200, one.text
    assert one.json()["context_kv"]["loaded"] and one.json()["answer"] == first["answers"][1]["answer"]


@pytest.mark.parametrize(
    "extra, message",
    [
        ({"question": "a?", "questions": ["b?"]}, "either question or questions"),
        ({}, "either question or questions"),
        ({"questions": []}, "questions"),
        ({"questions": ["a?", "  "]}, "one is empty"),
        ({"questions": ["a?"], "max_new_tokens": 100_000}, "new tokens per request"),
    ],
)
def test_bad_questions_are_refused_before_any_prefill(served, extra, message):
    client, _, _ = served
    got = client.post("/v1/ask", json={"context": CONTEXT, **extra})
    assert got.status_code == 400 and message in got.json()["error"]["message"], got.text


def test_ask_answers_as_the_library_does_within_the_budget(served):
    client, model, tok = served
    body = {"context": CONTEXT, "question": "which letter?", "max_new_tokens": 20}
    got = client.post("/v1/ask", json=body)
    assert got.status_code == 200, got.text
    record = got.json()
    prompt = build_prompt(CONTEXT, "which letter?")
    want = generate(model, tok, prompt, method="lsa", lsa=LSA, indexer="zero-shot", max_new_tokens=20)
    assert record["answer"] == want.text.strip()
    assert record["method"] == "lsa" and record["boundaries"] >= 1
    assert record["kv_bytes_device"] <= 0.5 * record["kv_bytes_full"]
    full = client.post("/v1/ask", json={**body, "method": "full"}).json()
    assert full["kv_ratio"] == 1.0 and full["boundaries"] == 0


def test_completions_and_chat_have_openai_shape_and_lsa_accounting(served):
    client, _, _ = served
    done = client.post("/v1/completions", json={"model": "tiny", "prompt": CONTEXT, "max_tokens": 12}).json()
    assert done["object"] == "text_completion" and done["choices"][0]["finish_reason"] in ("stop", "length")
    assert done["usage"]["prompt_tokens"] == len(CONTEXT)
    assert done["usage"]["completion_tokens"] == len(done["choices"][0]["text"]) <= 12
    assert done["flashmemory"]["method"] == "lsa" and done["flashmemory"]["kv_ratio"] <= 0.5
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": CONTEXT}]
    chat = client.post("/v1/chat/completions", json={"messages": messages, "max_tokens": 8, "budget": 0.4}).json()
    assert chat["object"] == "chat.completion" and chat["choices"][0]["message"]["role"] == "assistant"
    assert chat["usage"]["prompt_tokens"] == len("<system>be brief<user>" + CONTEXT + "<assistant>")
    assert chat["flashmemory"]["kv_ratio"] <= 0.4


def test_greedy_answers_do_not_depend_on_the_endpoint_run_before(served):
    client, _, _ = served
    # the fields clients send at their "off" values are accepted
    body = {"prompt": CONTEXT[:400], "max_tokens": 10, "temperature": 0, "logprobs": None, "top_logprobs": 0}
    first = client.post("/v1/completions", json=body).json()["choices"][0]["text"]
    client.post("/v1/ask", json={"context": CONTEXT, "question": "q?", "max_new_tokens": 5, "method": "full"})
    assert client.post("/v1/completions", json=body).json()["choices"][0]["text"] == first


@pytest.mark.parametrize(
    "path, body, status, message",
    [
        ("/v1/ask", {"context": CONTEXT, "question": "   "}, 400, "question is empty"),
        ("/v1/ask", {"context": "", "question": "q?"}, 400, "context"),
        ("/v1/ask", {"context": CONTEXT, "question": "q?", "budget": 1.5}, 400, "whole number of bytes"),
        ("/v1/ask", {"context": CONTEXT, "question": "q?", "budget": 0.001}, 400, "cannot hold the always-resident"),
        ("/v1/ask", {"context": CONTEXT, "question": "q?", "method": "sparse"}, 400, "method"),
        ("/v1/ask", {"context": CONTEXT, "question": "q?", "max_new_tokens": 41}, 400, "at most 40 new tokens"),
        ("/v1/ask", {"context": "x" * 8190, "question": "q?", "max_new_tokens": 8}, 400, "handles at most 8192"),
        ("/v1/completions", {"prompt": "abc", "temperature": 2.5}, 400, "temperature"),
        ("/v1/completions", {"prompt": "abc", "top_p": 0}, 400, "top_p"),
        ("/v1/completions", {"prompt": "abc", "n": 2}, 400, "one completion per request"),
        ("/v1/completions", {"prompt": "abc", "logprobs": 5}, 400, "log-probabilities are not returned"),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "logprobs": True}, 400, "logprobs"),
        ("/v1/completions", {"prompt": "abc", "presence_penalty": 0.5}, 400, "penalties are not supported"),
        ("/v1/completions", {"prompt": "abc", "stream": True, "max_tokens": 41}, 400, "at most 40 new tokens"),
        ("/v1/completions", {"prompt": "abc", "stop": ["a", "b", "c", "d", "e"]}, 400, "at most 4 strings"),
        ("/v1/completions", {"prompt": "abc", "stop": ""}, 400, "none of them empty"),
        ("/v1/completions", {"prompt": "abc", "model": "gpt-4"}, 404, "this server serves 'tiny'"),
        ("/v1/completions", {"prompt": "abc", "max_tokens": 0}, 400, "max_tokens"),
        ("/v1/completions", {"prompt": "abc", "logit_bias": {}}, 400, "logit_bias"),
        ("/v1/chat/completions", {"messages": []}, 400, "messages"),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": " "}]}, 400, "every message is empty"),
        ("/v1/chat/completions", {"messages": [{"role": "robot", "content": "hi"}]}, 400, "role"),
    ],
)
def test_bad_requests_get_one_clear_message(served, path, body, status, message):
    client, _, _ = served
    got = client.post(path, json=body)
    assert got.status_code == status, got.text
    error = got.json()["error"]
    assert message in error["message"] and error["type"] in ("invalid_request_error", "model_not_found")


def test_a_model_without_a_chat_template_reads_a_plain_transcript():
    engine = Engine(tiny_model("llama"), BatchCharTokenizer(), "tiny", lsa=LSA)
    ids = engine.chat_ids([{"role": "user", "content": "hi"}])
    assert ids.shape[1] == len("user: hi\nassistant:")


def test_serve_command_refuses_bad_options_before_loading_a_model():
    from typer.testing import CliRunner

    from flashmemory.cli import app

    runner = CliRunner()
    got = runner.invoke(app, ["serve", "--port", "70000", "--model", "no-such-model"])
    assert got.exit_code == 2 and "--port must be in 1..65535" in got.output
    got = runner.invoke(app, ["serve", "--lsa", "bogus=1", "--model", "no-such-model"])
    assert got.exit_code == 2 and "unknown LSA setting 'bogus'" in got.output


def test_concurrent_requests_each_get_their_own_answer(served):
    from concurrent.futures import ThreadPoolExecutor

    client, _, _ = served
    bodies = [{"prompt": CONTEXT[i * 50 : i * 50 + 300], "max_tokens": 6} for i in range(4)]
    alone = [client.post("/v1/completions", json=b).json()["choices"][0]["text"] for b in bodies]
    with ThreadPoolExecutor(4) as pool:
        together = list(pool.map(lambda b: client.post("/v1/completions", json=b).json()["choices"][0]["text"], bodies))
    assert together == alone


def _events(response) -> list:
    import json

    assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
    lines = [line.removeprefix("data: ") for line in response.text.split("\n\n") if line.strip()]
    assert lines[-1] == "[DONE]"
    return [json.loads(line) for line in lines[:-1]]


def test_streams_carry_the_same_answer_piece_by_piece(served):
    client, _, _ = served
    body = {"prompt": CONTEXT[:500], "max_tokens": 12}
    whole = client.post("/v1/completions", json=body).json()
    events = _events(client.post("/v1/completions", json={**body, "stream": True}))
    assert len(events) >= 2 and all(e["object"] == "text_completion" for e in events)
    assert "".join(e["choices"][0]["text"] for e in events) == whole["choices"][0]["text"]
    assert all(e["choices"][0]["finish_reason"] is None for e in events[:-1])
    last = events[-1]
    assert last["choices"][0]["finish_reason"] == whole["choices"][0]["finish_reason"]
    assert last["usage"] == whole["usage"] and last["flashmemory"]["kv_ratio"] == whole["flashmemory"]["kv_ratio"]

    messages = [{"role": "user", "content": CONTEXT[:500]}]
    chat = client.post("/v1/chat/completions", json={"messages": messages, "max_tokens": 10}).json()
    events = _events(client.post("/v1/chat/completions", json={"messages": messages, "max_tokens": 10, "stream": True}))
    assert events[0]["choices"][0]["delta"]["role"] == "assistant"
    assert all(e["object"] == "chat.completion.chunk" for e in events)
    streamed = "".join(e["choices"][0]["delta"].get("content", "") for e in events)
    assert streamed == chat["choices"][0]["message"]["content"]
    assert events[-1]["usage"] == chat["usage"]


def test_a_token_callback_that_raises_stops_decoding_there():
    from flashmemory.runtime.generate import generate_ids

    class Gone(Exception):
        pass

    seen = []

    def on_token(tok):
        seen.append(int(tok[0]))
        if len(seen) == 3:
            raise Gone

    ids = torch.randint(3, 200, (1, 300))
    with pytest.raises(Gone):
        generate_ids(tiny_model("llama"), ids, method="lsa", lsa=LSA, max_new_tokens=30, on_token=on_token)
    assert len(seen) == 3
    out, _ = generate_ids(tiny_model("llama"), ids, method="lsa", lsa=LSA, max_new_tokens=5, on_token=seen.append)
    assert [int(t[0]) for t in seen[3:]] == out[0].tolist()


@pytest.mark.cuda
def test_the_server_on_cuda_answers_as_the_library_does():
    from flashmemory.runtime.generate import generate_ids

    model = tiny_model("llama").cuda()
    tok = BatchCharTokenizer()
    engine = Engine(model, tok, "tiny", lsa=LSA, max_new_tokens=40)
    ids = tok(CONTEXT)["input_ids"]
    want, stats = generate_ids(model, ids, method="lsa", lsa=LSA, max_new_tokens=20, eos_token_id=tok.eos_token_id)
    with TestClient(create_app(engine)) as client:
        assert client.get("/health").json()["device"].startswith("cuda")
        got = client.post("/v1/completions", json={"prompt": CONTEXT, "max_tokens": 20}).json()
        streamed = client.post("/v1/completions", json={"prompt": CONTEXT, "max_tokens": 20, "stream": True})
    assert got["choices"][0]["text"] == tok.decode(want[0].tolist())
    assert got["flashmemory"]["kv_bytes_device"] == stats.kv_bytes_device and got["flashmemory"]["kv_ratio"] <= 0.5
    assert "".join(e["choices"][0]["text"] for e in _events(streamed)) == got["choices"][0]["text"]


@pytest.mark.cuda
def test_graph_replay_in_the_server_answers_as_eager_decoding_cuda():
    from concurrent.futures import ThreadPoolExecutor

    from flashmemory.runtime.sampling import Sampling

    model = tiny_model("llama").cuda()
    tok = BatchCharTokenizer(chat_template="tiny")
    lsa = LSAConfig(budget=0.3, **SMALL_LSA)
    eager = Engine(model, tok, "tiny", lsa=lsa, max_new_tokens=40, max_batch=2, batch_wait=0.5, cuda_graph=False)
    # unset, as ``flashmemory serve`` and the Engine's default leave it: chosen, since this model and device can replay
    graph = Engine(model, tok, "tiny", lsa=lsa, max_new_tokens=40, max_batch=2, batch_wait=0.5)
    assert graph.cuda_graph is True and eager.cuda_graph is False
    prompts = [tok(CONTEXT * 3)["input_ids"], tok(CONTEXT[:600] * 3)["input_ids"]]

    def one_by_one(engine, **kw):
        return [engine.answer(p, LSAChoice(), 30, **kw) for p in prompts]

    def together(engine):  # a batch of two, each sequence with its own pages
        with ThreadPoolExecutor(2) as pool:
            return [f.result() for f in [pool.submit(engine.answer, p, LSAChoice(), 30) for p in prompts]]

    want, got = one_by_one(eager), one_by_one(graph)
    assert [g.text for g in got] == [w.text for w in want]
    assert [g.stats.kv_bytes_device for g in got] == [w.stats.kv_bytes_device for w in want]
    assert all(g.stats.boundaries >= 2 for g in got)
    sampled = dict(sampling=Sampling(temperature=1.0, seed=2), stop=["zz"])
    assert [g.text for g in one_by_one(graph, **sampled)] == [w.text for w in one_by_one(eager, **sampled)]
    want, got = together(eager), together(graph)
    assert [g.text for g in got] == [w.text for w in want] and got[0].stats.batch_size == 2
    questions = ["which letter?", "what comes last?"]
    want, _ = eager.answer_questions(CONTEXT * 3, questions, LSAChoice(), 12)
    got, _ = graph.answer_questions(CONTEXT * 3, questions, LSAChoice(), 12)
    assert [g.text for g in got] == [w.text for w in want]


def test_graph_replay_the_model_cannot_run_is_refused_when_the_engine_is_made():
    with pytest.raises(ValueError, match="CUDA device"):
        Engine(tiny_model("llama"), BatchCharTokenizer(), "tiny", lsa=LSA, cuda_graph=True)
    # unset, it is not chosen here, and the server says so
    engine = Engine(tiny_model("llama"), BatchCharTokenizer(), "tiny", lsa=LSA, cuda_graph=None)
    assert engine.cuda_graph is False
    with TestClient(create_app(engine)) as client:
        assert client.get("/health").json()["cuda_graph"] is False


def test_a_deepseek_v4_model_is_served_through_its_own_backend():
    from flashmemory.deepseek_v4.cache import deepseek_v4_lsa_config
    from flashmemory.deepseek_v4.configs import tiny_deepseek_v4
    from flashmemory.deepseek_v4.generate import generate_ids as v4_generate_ids

    model = tiny_deepseek_v4()
    tok = BatchCharTokenizer()
    lsa = deepseek_v4_lsa_config(page_chunks=4, interval=16, recent=16, sink=4, budget=0.6)
    ids = tok(CONTEXT)["input_ids"]
    want, stats = v4_generate_ids(model, ids, lsa=lsa, max_new_tokens=12, eos_token_id=tok.eos_token_id)
    with TestClient(create_app(Engine(model, tok, "v4-tiny", lsa=lsa, max_new_tokens=40))) as client:
        got = client.post("/v1/completions", json={"prompt": CONTEXT, "max_tokens": 12}).json()
        full = client.post("/v1/completions", json={"prompt": CONTEXT, "max_tokens": 12, "method": "full"}).json()
    assert got["choices"][0]["text"] == tok.decode(want[0].tolist())
    assert got["flashmemory"]["kv_bytes_device"] == stats.kv_bytes_device
    assert got["flashmemory"]["boundaries"] >= 1 and got["flashmemory"]["kv_ratio"] < 1.0
    assert full["flashmemory"]["kv_ratio"] == 1.0


def test_requests_that_arrive_together_are_decoded_together_and_answered_as_alone():
    from concurrent.futures import ThreadPoolExecutor

    from flashmemory.serve import ClientGone

    model, tok = tiny_model("llama"), BatchCharTokenizer()
    # every page resident: a batch then answers each prompt exactly as it is answered alone
    every = LSAConfig(budget=None, max_pages=1000, **SMALL_LSA)
    alone = Engine(model, tok, "tiny", lsa=every, max_new_tokens=40)
    together = Engine(model, tok, "tiny", lsa=every, max_new_tokens=40, max_batch=4, batch_wait=0.5)
    prompts = [CONTEXT[: 300 + 90 * i] for i in range(4)]
    lsa, full = LSAChoice(), LSAChoice(method="full")
    want = [alone.answer(tok(p)["input_ids"], lsa, 6 + i) for i, p in enumerate(prompts)]
    assert all(a.stats.batch_size == 1 for a in want)
    with ThreadPoolExecutor(5) as pool:
        jobs = [pool.submit(together.answer, tok(p)["input_ids"], lsa, 6 + i) for i, p in enumerate(prompts)]
        other = pool.submit(together.answer, tok(prompts[0])["input_ids"], full, 6)  # another method: its own batch
        got = [j.result() for j in jobs]
    assert [g.text for g in got] == [w.text for w in want]
    assert [g.completion_tokens for g in got] == [w.completion_tokens for w in want]
    assert [g.finish_reason for g in got] == [w.finish_reason for w in want]
    assert max(g.stats.batch_size for g in got) > 1  # the point of the wait
    assert other.result().stats.method == "full" and other.result().stats.batch_size == 1

    # a client that leaves drops its own sequence only
    def leave(tok_id):
        raise ClientGone

    with ThreadPoolExecutor(2) as pool:
        gone = pool.submit(together.answer, tok(prompts[1])["input_ids"], lsa, 30, leave)
        kept = pool.submit(together.answer, tok(prompts[2])["input_ids"], lsa, 8)
        assert kept.result().text == alone.answer(tok(prompts[2])["input_ids"], lsa, 8).text
        assert gone.result().stats.batch_size == 2  # it was decoded with the other, which went on without it


def test_a_batch_ends_each_answer_at_its_own_stop_strings_and_seeded_requests_decode_alone():
    from concurrent.futures import ThreadPoolExecutor

    from flashmemory.runtime.sampling import Sampling

    model, tok = tiny_model("llama"), BatchCharTokenizer()
    every = LSAConfig(budget=None, max_pages=1000, **SMALL_LSA)
    alone = Engine(model, tok, "tiny", lsa=every, max_new_tokens=40)
    together = Engine(model, tok, "tiny", lsa=every, max_new_tokens=40, max_batch=3, batch_wait=0.5)
    prompts = [tok(CONTEXT[: 300 + 150 * i])["input_ids"] for i in range(3)]
    free = [alone.answer(p, LSAChoice(), 20).text for p in prompts]
    stops = [[free[0][6:8]], [], [free[2][3:5], "\x00"]]
    with ThreadPoolExecutor(3) as pool:
        got = list(pool.map(lambda i: together.answer(prompts[i], LSAChoice(), 20, stop=stops[i]), range(3)))
    assert max(g.stats.batch_size for g in got) > 1
    for text, stop, g in zip(free, stops, got, strict=True):
        want = text[: min([text.find(s) for s in stop if s in text], default=len(text))]
        assert g.text == want
        assert g.finish_reason == ("stop" if want != text else "length")

    seeded = Sampling(temperature=1.0, seed=5)
    want = alone.answer(prompts[0], LSAChoice(), 12, sampling=seeded)
    with ThreadPoolExecutor(2) as pool:
        a = pool.submit(together.answer, prompts[0], LSAChoice(), 12, sampling=seeded)
        b = pool.submit(together.answer, prompts[1], LSAChoice(), 12, sampling=seeded)
        assert a.result().text == want.text  # not batched with b, whose draws would come from the same generator
        assert a.result().stats.batch_size == b.result().stats.batch_size == 1


def test_engine_settings_out_of_range_are_refused():
    with pytest.raises(ValueError, match="max_batch"):
        Engine(tiny_model("llama"), BatchCharTokenizer(), "tiny", max_batch=0)


def test_a_batch_under_a_budget_stays_within_it():
    from concurrent.futures import ThreadPoolExecutor

    model, tok = tiny_model("llama"), BatchCharTokenizer()
    engine = Engine(model, tok, "tiny", lsa=LSA, max_new_tokens=40, max_batch=3, batch_wait=0.5)
    with ThreadPoolExecutor(3) as pool:
        got = list(pool.map(lambda n: engine.answer(tok(CONTEXT[:n])["input_ids"], LSAChoice(), 8), (300, 500, 700)))
    stats = got[0].stats
    assert stats.batch_size == 3 and all(g.stats is stats for g in got)
    assert stats.kv_bytes_device <= LSA.budget * stats.kv_bytes_full and stats.boundaries >= 1


def test_an_api_key_guards_the_v1_endpoints_but_not_health():
    engine = Engine(tiny_model("llama"), BatchCharTokenizer(), "tiny", lsa=LSA, max_new_tokens=8)
    with TestClient(create_app(engine, api_key="s3cret")) as client:
        assert client.get("/health").status_code == 200
        body = {"prompt": CONTEXT[:200], "max_tokens": 4}
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"}):
            got = client.post("/v1/completions", json=body, headers=headers)
            assert got.status_code == 401 and got.json()["error"]["type"] == "invalid_api_key"
        assert client.get("/v1/models").status_code == 401
        ok = client.post("/v1/completions", json=body, headers={"Authorization": "Bearer s3cret"})
        assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] >= 1
    with pytest.raises(ValueError, match="API key is empty"):
        create_app(engine, api_key=" ")


def test_serve_command_refuses_an_unset_api_key_variable(monkeypatch):
    from typer.testing import CliRunner

    from flashmemory.cli import app

    monkeypatch.delenv("FM_TEST_KEY", raising=False)
    got = CliRunner().invoke(app, ["serve", "--api-key-env", "FM_TEST_KEY", "--model", "no-such-model"])
    assert got.exit_code == 2 and "FM_TEST_KEY: that environment variable is not set" in got.output


def test_a_missing_server_extra_is_named_with_its_install_line(monkeypatch):
    import sys

    from typer.testing import CliRunner

    from flashmemory.cli import app

    monkeypatch.setitem(sys.modules, "uvicorn", None)  # as if it were not installed
    got = CliRunner().invoke(app, ["serve", "--model", "no-such-model"])
    assert got.exit_code == 2 and "pip install 'flashmemory[serve]'" in got.output  # brackets survive the printing


def test_stop_strings_end_answers_streamed_or_not_without_sending_any_part_of_them(served):
    client, _, _ = served
    body = {"prompt": CONTEXT[:500], "max_tokens": 30}
    text = client.post("/v1/completions", json=body).json()["choices"][0]["text"]
    assert len(text) >= 20
    stop = text[10:13]
    cut = text[: text.find(stop)]
    done = client.post("/v1/completions", json={**body, "stop": [stop, "\x00"]}).json()
    assert done["choices"][0]["text"] == cut and done["choices"][0]["finish_reason"] == "stop"
    assert done["usage"]["completion_tokens"] == text.find(stop) + len(stop)
    events = _events(client.post("/v1/completions", json={**body, "stop": stop, "stream": True}))
    pieces = [e["choices"][0]["text"] for e in events]
    # pieces are only ever appended: their sum being the cut text means no character of the stop string went out
    assert "".join(pieces) == cut and events[-1]["choices"][0]["finish_reason"] == "stop"
    messages = [{"role": "user", "content": CONTEXT[:500]}]
    chat = client.post("/v1/chat/completions", json={"messages": messages, "max_tokens": 30}).json()
    reply = chat["choices"][0]["message"]["content"]
    stop = reply[5:7]
    stopped = client.post("/v1/chat/completions", json={"messages": messages, "max_tokens": 30, "stop": stop}).json()
    assert stopped["choices"][0]["message"]["content"] == reply[: reply.find(stop)]


def test_sampled_answers_repeat_with_a_seed(served):
    client, _, _ = served
    body = {"prompt": CONTEXT[:500], "max_tokens": 16, "temperature": 1.0, "top_p": 0.95, "top_k": 50}
    a = client.post("/v1/completions", json={**body, "seed": 11}).json()["choices"][0]["text"]
    b = client.post("/v1/completions", json={**body, "seed": 11}).json()["choices"][0]["text"]
    c = client.post("/v1/completions", json={**body, "seed": 12}).json()["choices"][0]["text"]
    greedy = client.post("/v1/completions", json={"prompt": CONTEXT[:500], "max_tokens": 16}).json()
    assert a == b and a != c and a != greedy["choices"][0]["text"]
    unseeded = client.post("/v1/completions", json=body)
    assert unseeded.status_code == 200 and unseeded.json()["usage"]["completion_tokens"] >= 1


def test_a_prompt_too_short_for_lsa_is_answered_with_full_attention(served):
    client, _, _ = served
    body = {"messages": [{"role": "user", "content": "hi there"}], "max_tokens": 6}
    short = client.post("/v1/chat/completions", json=body)
    assert short.status_code == 200, short.text
    full = client.post("/v1/chat/completions", json={**body, "method": "full"}).json()
    got = short.json()
    assert got["flashmemory"]["method"] == "full" and got["flashmemory"]["kv_ratio"] == 1.0
    assert got["choices"][0]["message"]["content"] == full["choices"][0]["message"]["content"]
    streamed = _events(client.post("/v1/chat/completions", json={**body, "stream": True}))
    assert (
        "".join(e["choices"][0]["delta"].get("content", "") for e in streamed)
        == full["choices"][0]["message"]["content"]
    )
    # several questions about a short context: one full-attention session
    asked = client.post("/v1/ask", json={"context": "abc def", "questions": ["a?", "b?"], "max_new_tokens": 4})
    assert asked.status_code == 200, asked.text
    assert all(a["method"] == "full" for a in asked.json()["answers"])
    # a budget the request gives itself is held to
    own = client.post("/v1/chat/completions", json={**body, "budget": 0.5})
    assert own.status_code == 400 and "cannot hold the always-resident part" in own.json()["error"]["message"]
    own = client.post("/v1/ask", json={"context": "abc def", "questions": ["a?"], "max_new_tokens": 4, "budget": 0.5})
    assert own.status_code == 400 and "cannot hold the always-resident part" in own.json()["error"]["message"]


def test_a_server_budget_in_bytes_is_held_to_even_for_a_short_prompt():
    model, tok = tiny_model("llama"), BatchCharTokenizer()
    engine = Engine(model, tok, "tiny", lsa=LSAConfig(budget=2_000, **SMALL_LSA), max_new_tokens=8)
    with pytest.raises(ValueError, match="cannot hold the always-resident part"):
        engine.answer(tok("hi there")["input_ids"], LSAChoice(), 4)
