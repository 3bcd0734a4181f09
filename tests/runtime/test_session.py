"""A session: the context prefilled once, each question prefilled against it and answered as if asked alone."""

import pytest
import torch

from flashmemory.attention.prefix import PrefixKV
from flashmemory.config import LSAConfig
from flashmemory.models.tiny import tiny_model
from flashmemory.runtime import session as session_module
from flashmemory.runtime.generate import generate
from flashmemory.runtime.session import Session, build_prompt

from ..bench.fake_tokenizers import BatchCharTokenizer
from ..conftest import SMALL_LSA

CONTEXT = "".join(chr(97 + (i * 11) % 26) for i in range(600))
QUESTIONS = ("which letter comes twice?", "and the one after it?", "how many letters are there?")


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama")


def _one_shot(model, tok, question, **kw):
    return generate(model, tok, build_prompt(CONTEXT, question), max_new_tokens=12, **kw)


@pytest.mark.parametrize(
    "kw",
    [
        dict(method="full"),
        dict(method="lsa", indexer=None, lsa=LSAConfig(budget=0.3, attention_backend="mask", **SMALL_LSA)),
        dict(method="lsa", indexer=None, lsa=LSAConfig(budget=0.3, attention_backend="torch", **SMALL_LSA)),
    ],
    ids=["full", "lsa-mask", "lsa-torch"],
)
def test_every_answer_is_the_one_a_request_of_its_own_gives(model, kw):
    tok = BatchCharTokenizer(chat_template="tiny")
    session = Session(model, tok, CONTEXT, **kw)
    # each question prefills its own turn, and under LSA the context's last query_window tokens again
    redo = 0 if kw["method"] == "full" else kw["lsa"].query_window
    assert session.prefix.length == len("<user>" + CONTEXT) - redo
    answers = [session.ask(q, max_new_tokens=12) for q in QUESTIONS]
    for q, got in zip(QUESTIONS, answers, strict=True):
        want = _one_shot(model, tok, q, **kw)
        assert got.token_ids == want.token_ids
        assert got.stats.context_tokens == want.stats.context_tokens
        assert got.stats.kv_bytes_full == want.stats.kv_bytes_full
        if kw["method"] == "lsa":
            # the resident set is chosen as for the one-shot prompt, under the same budget
            assert got.stats.pages_recalled == want.stats.pages_recalled
            assert got.stats.kv_ratio <= 0.3
    # the context's prefill is counted once, on the first answer
    assert answers[0].stats.prefill_seconds >= session.prefill_seconds > 0


def test_a_sliding_window_model_continues_its_window_from_the_prefix():
    gemma = tiny_model("gemma3")
    tok = BatchCharTokenizer(chat_template="tiny")
    assert gemma.config.sliding_window < len(CONTEXT)
    for kw in (dict(method="full"), dict(method="lsa", indexer=None, lsa=LSAConfig(budget=0.3, **SMALL_LSA))):
        session = Session(gemma, tok, CONTEXT, **kw)
        for q in QUESTIONS[:2]:
            want = generate(gemma, tok, build_prompt(CONTEXT, q), max_new_tokens=12, **kw)
            assert session.ask(q, max_new_tokens=12).token_ids == want.token_ids


def test_the_prefix_holds_what_a_prefill_leaves_in_a_full_cache(model):
    ids = torch.randint(3, 200, (1, 90))
    prefix = PrefixKV.capture(model, ids)
    assert prefix.length == 90 and all(t.device.type == "cpu" for t in prefix.keys)
    ref = model(input_ids=ids, use_cache=True).past_key_values
    cache = prefix.dynamic_cache(model)
    for mine, theirs in zip(cache.layers, ref.layers, strict=True):
        torch.testing.assert_close(mine.keys, theirs.keys)
        torch.testing.assert_close(mine.values, theirs.values)
    assert prefix.host_bytes == sum(2 * layer.keys.numel() * layer.keys.element_size() for layer in ref.layers)


def test_a_question_that_does_not_start_with_the_prefix_tokens_is_prefilled_whole(model, monkeypatch):
    tok = BatchCharTokenizer(chat_template="tiny")
    session = Session(model, tok, CONTEXT, method="full")
    session.prefix_ids = session.prefix_ids[:-1] + [session.prefix_ids[-1] + 1]  # as if tokens merged differently
    seen = []
    real = session_module.generate_ids

    def spy(*args, **kw):
        seen.append(kw["prefix"])
        return real(*args, **kw)

    monkeypatch.setattr(session_module, "generate_ids", spy)
    got = session.ask(QUESTIONS[0], max_new_tokens=12)
    assert seen == [None]
    assert got.token_ids == _one_shot(model, tok, QUESTIONS[0], method="full").token_ids


def test_without_a_chat_template_the_prompt_is_plain_text(model):
    tok = BatchCharTokenizer()
    session = Session(model, tok, CONTEXT, method="full")
    assert session.prefix.length == len(CONTEXT)
    got = session.ask(QUESTIONS[0], max_new_tokens=6)
    assert (
        got.token_ids
        == generate(model, tok, build_prompt(CONTEXT, QUESTIONS[0]), method="full", max_new_tokens=6).token_ids
    )


def test_bad_sessions_and_questions_get_one_clear_message(model):
    tok = BatchCharTokenizer(chat_template="tiny")
    with pytest.raises(ValueError, match="context is empty"):
        Session(model, tok, "  ", method="full")
    with pytest.raises(ValueError, match="unknown method"):
        Session(model, tok, CONTEXT, method="sparse")
    window = model.config.max_position_embeddings
    with pytest.raises(ValueError, match=f"at most {window}"):
        Session(model, tok, "ab " * window, method="full")
    session = Session(model, tok, CONTEXT, method="full")
    with pytest.raises(ValueError, match="question is empty"):
        session.ask(" ")
    with pytest.raises(ValueError, match="max_new_tokens"):
        session.ask("which?", max_new_tokens=0)
    with pytest.raises(ValueError, match=f"at most {window}"):
        session.ask("which?", max_new_tokens=window)
    assert session.ask("which?", max_new_tokens=3).stats.new_tokens <= 3  # a refused question changes nothing


def test_a_turn_shorter_than_the_lookahead_query_still_reads_the_whole_prompts_window(model):
    tok = BatchCharTokenizer()
    lsa = LSAConfig(budget=0.3, query_window=48, **SMALL_LSA)  # wider than the turn "\n\nAnswer ... ab?"
    session = Session(model, tok, CONTEXT, indexer=None, lsa=lsa)
    assert len(build_prompt(CONTEXT, "ab?")) - len(CONTEXT) < 48
    got = session.ask("ab?", max_new_tokens=12)
    want = generate(model, tok, build_prompt(CONTEXT, "ab?"), indexer=None, lsa=lsa, max_new_tokens=12)
    assert got.token_ids == want.token_ids and got.stats.pages_recalled == want.stats.pages_recalled


@pytest.mark.parametrize("method", ["lsa", "full"])
def test_graph_replay_off_cuda_is_refused_before_the_context_prefill(model, method):
    calls = []
    hook = model.register_forward_pre_hook(lambda *_: calls.append(1))
    try:
        with pytest.raises(ValueError, match="graph replay"):
            Session(model, BatchCharTokenizer(chat_template="tiny"), CONTEXT, method=method, cuda_graph=True)
    finally:
        hook.remove()
    assert not calls


@pytest.mark.parametrize("method", ["lsa", "full"])
def test_unset_graph_replay_off_cuda_decodes_eagerly(model, method):
    session = Session(model, BatchCharTokenizer(chat_template="tiny"), CONTEXT, method=method, indexer=None)
    assert session.cuda_graph is False
    assert session.ask("ab?", max_new_tokens=4).stats.new_tokens >= 1
