"""A session on CUDA: the fast decode path (and its CUDA graph) answers each question as a request of its own."""

import pytest
import torch

from flashmemory.config import LSAConfig
from flashmemory.models.tiny import tiny_model
from flashmemory.runtime.generate import generate
from flashmemory.runtime.session import Session, build_prompt

from ..bench.fake_tokenizers import BatchCharTokenizer
from ..conftest import SMALL_LSA

pytestmark = pytest.mark.cuda

CONTEXT = "".join(chr(97 + (i * 7) % 26) for i in range(900))
QUESTIONS = ("which letter comes twice?", "and the one after it?")


@pytest.mark.parametrize(
    ("family", "cuda_graph"),
    [("llama", False), ("llama", True), ("llama", None), ("gemma3", False), ("gemma3", None)],
    ids=["llama", "graph", "llama-unset", "gemma3", "gemma3-unset"],
)
@pytest.mark.parametrize("backend", ["auto", "torch"])
def test_session_answers_equal_one_shot_answers_cuda(family, cuda_graph, backend):
    model = tiny_model(family).cuda()
    tok = BatchCharTokenizer(chat_template="tiny")
    kw = dict(method="lsa", indexer=None, lsa=LSAConfig(budget=0.3, attention_backend=backend, **SMALL_LSA))
    session = Session(model, tok, CONTEXT, cuda_graph=cuda_graph, **kw)
    # unset: replayed wherever it can run, which a sliding-window model cannot
    assert session.cuda_graph is (family == "llama" if cuda_graph is None else cuda_graph)
    for q in QUESTIONS:
        got = session.ask(q, max_new_tokens=24)
        want = generate(model, tok, build_prompt(CONTEXT, q), max_new_tokens=24, cuda_graph=cuda_graph, **kw)
        assert got.token_ids == want.token_ids
        assert got.stats.pages_recalled == want.stats.pages_recalled
        assert got.stats.kv_bytes_device == want.stats.kv_bytes_device
    assert session.answered == len(QUESTIONS)


def test_graph_replay_on_a_sliding_window_model_is_refused_before_the_context_prefill_cuda():
    model = tiny_model("gemma3").cuda()
    calls = []
    model.register_forward_pre_hook(lambda *_: calls.append(1))
    with pytest.raises(ValueError, match="full-attention"):
        Session(model, BatchCharTokenizer(chat_template="tiny"), CONTEXT, indexer=None, cuda_graph=True)
    assert not calls


def test_full_attention_session_on_cuda_keeps_the_prefix_on_the_host_cuda():
    model = tiny_model("llama").cuda()
    tok = BatchCharTokenizer(chat_template="tiny")
    session = Session(model, tok, CONTEXT, method="full")
    assert all(t.device.type == "cpu" for t in session.prefix.keys)
    for q in QUESTIONS:
        want = generate(model, tok, build_prompt(CONTEXT, q), method="full", max_new_tokens=24)
        assert session.ask(q, max_new_tokens=24).token_ids == want.token_ids
    torch.cuda.synchronize()


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_a_context_saved_on_cuda_is_read_back_page_locked_and_answers_alike_cuda(family, tmp_path):
    model = tiny_model(family).cuda()
    tok = BatchCharTokenizer(chat_template="tiny")
    kw = dict(method="lsa", indexer=None, lsa=LSAConfig(budget=0.3, **SMALL_LSA), kv_cache=tmp_path)
    saved = Session(model, tok, CONTEXT, **kw)
    read = Session(model, tok, CONTEXT, **kw)
    assert not saved.loaded and read.loaded
    assert all(t.is_pinned() for t in (*read.prefix.keys, *read.prefix.values))
    for q in QUESTIONS:
        want, got = saved.ask(q, max_new_tokens=16), read.ask(q, max_new_tokens=16)
        assert got.token_ids == want.token_ids and got.stats.pages_recalled == want.stats.pages_recalled
