"""An LSA session lends its context's host copy to each question's cache as the mirror.

The context's tokens are then in place: a question's prefill writes only its own tokens to the host, and no
question locks a mirror of its own. These tests pin that down, and that answers stay those of a request of its own.
"""

import importlib
import weakref

import pytest
import torch

from flashmemory.attention.prefix import PrefixKV
from flashmemory.config import LSAConfig
from flashmemory.memory.layout import ReserveLayout
from flashmemory.memory.store import KVStore, PrefilledMirror
from flashmemory.models.tiny import tiny_model
from flashmemory.runtime import session as session_module
from flashmemory.runtime.generate import generate
from flashmemory.runtime.session import Session, build_prompt

from ..bench.fake_tokenizers import BatchCharTokenizer
from ..conftest import SMALL_LSA

gen = importlib.import_module("flashmemory.runtime.generate")

CONTEXT = "".join(chr(97 + (i * 11) % 26) for i in range(700))
QUESTIONS = ("which letter comes twice?", "and the one after it?")
LSA = LSAConfig(budget=0.3, attention_backend="mask", **SMALL_LSA)


@pytest.fixture
def stores(monkeypatch):
    """Every store made by a cache, with the bytes its prefill wrote to the host."""
    made = []
    write = KVStore.write_prefill

    def spy(self, layer, keys, values):
        if not made or made[-1][0] is not self:
            made.append((self, []))
        before = self.log.d2h_bytes
        write(self, layer, keys, values)
        made[-1][1].append(self.log.d2h_bytes - before)

    monkeypatch.setattr(KVStore, "write_prefill", spy)
    return made


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_questions_write_only_their_own_tokens_and_answer_as_alone(family, stores):
    model = tiny_model(family)
    tok = BatchCharTokenizer(chat_template="tiny")
    session = Session(model, tok, CONTEXT, method="lsa", indexer=None, lsa=LSA)
    n = session.prefix.length
    for q in QUESTIONS:
        got = session.ask(q, max_new_tokens=12)
        store, written = stores[-1]
        want = generate(model, tok, build_prompt(CONTEXT, q), max_new_tokens=12, method="lsa", indexer=None, lsa=LSA)
        assert got.token_ids == want.token_ids
        assert got.stats.pages_recalled == want.stats.pages_recalled
        assert store._prefilled is not None and store._prefilled.owner is session.prefix
        full = [i for i, w in enumerate(session.prefix.window) if w is None]
        assert store.mirror_k[full[0]].data_ptr() == session.prefix.spans[full[0]][0].data_ptr()
        # the question's tokens (those after the prefix) are all that crossed to the host at prefill
        token_bytes = 2 * store._token_bytes()
        assert written == [(got.stats.context_tokens - n) * token_bytes] * len(store.layers)
        del store
        stores.clear()  # a store still held keeps the context's tensors lent: the next question would copy


def test_the_context_stays_as_captured_after_questions():
    model = tiny_model("llama")
    tok = BatchCharTokenizer(chat_template="tiny")
    session = Session(model, tok, CONTEXT, method="lsa", indexer=None, lsa=LSA)
    before = [k.clone() for k in session.prefix.keys]
    for q in QUESTIONS:
        session.ask(q, max_new_tokens=40)  # long enough to flush cycles into the room after the context
    for k0, k1 in zip(before, session.prefix.keys, strict=True):
        torch.testing.assert_close(k0, k1, rtol=0, atol=0)


def test_a_question_longer_than_the_room_gets_a_mirror_of_its_own(monkeypatch, stores):
    monkeypatch.setattr(session_module, "QUESTION_ROOM", 8)
    model = tiny_model("llama")
    tok = BatchCharTokenizer(chat_template="tiny")
    session = Session(model, tok, CONTEXT, method="lsa", indexer=None, lsa=LSA)
    got = session.ask(QUESTIONS[0], max_new_tokens=12)
    store, written = stores[-1]
    want = generate(
        model, tok, build_prompt(CONTEXT, QUESTIONS[0]), max_new_tokens=12, method="lsa", indexer=None, lsa=LSA
    )
    assert got.token_ids == want.token_ids
    assert store._prefilled is None
    assert written == [got.stats.context_tokens * 2 * store._token_bytes()] * len(store.layers)


def test_the_host_copy_is_lent_to_one_cache_at_a_time():
    model = tiny_model("llama")
    ids = torch.randint(3, 256, (1, 300), generator=torch.Generator().manual_seed(0))
    prefix = PrefixKV.capture(model, ids, room=64)
    layers = list(range(4))
    first = prefix.lend_mirror(layers, 364, torch.float32)
    assert isinstance(first, PrefilledMirror) and first.length == 300
    assert prefix.lend_mirror(layers, 364, torch.float32) is None  # still in use
    ref = weakref.ref(first)
    del first
    assert ref() is None
    assert prefix.lend_mirror(layers, 364, torch.float32) is not None  # free again
    assert prefix.lend_mirror(layers, 365, torch.float32) is None  # no room for that many tokens
    assert prefix.lend_mirror(layers, 300, torch.bfloat16) is None  # another dtype
    assert PrefixKV.capture(model, ids).lend_mirror(layers, 300, torch.float32) is None  # captured without room
    # the room is host memory the prefix holds
    assert prefix.host_bytes == PrefixKV.capture(model, ids).host_bytes * 364 // 300


def test_a_saved_context_loads_with_room_and_lends_it(tmp_path):
    model = tiny_model("llama")
    ids = torch.randint(3, 256, (1, 200), generator=torch.Generator().manual_seed(2))
    prefix = PrefixKV.capture(model, ids)
    prefix.save(tmp_path / "ctx", {"tokens": 200})
    loaded = PrefixKV.load(tmp_path / "ctx", {"tokens": 200}, torch.device("cpu"), room=32)
    lent = loaded.lend_mirror(list(range(4)), 232, torch.float32)
    assert lent is not None
    for i in range(4):
        torch.testing.assert_close(lent.keys[i][:, :, :200], prefix.keys[i], rtol=0, atol=0)
        torch.testing.assert_close(loaded.keys[i], prefix.keys[i], rtol=0, atol=0)


def test_a_store_refuses_a_prefilled_mirror_of_another_shape():
    store = KVStore([0], ReserveLayout(4, 3, 16, 16 + 15 + 16), recent=16)
    bad = PrefilledMirror({0: torch.zeros(1, 2, 50, 16)}, {0: torch.zeros(1, 2, 50, 16)}, 40)
    with pytest.raises(ValueError, match="cannot hold"):
        store.allocate(
            1,
            2,
            16,
            dtype=torch.float32,
            device="cpu",
            capacity=80,
            pad_len=torch.zeros(1, dtype=torch.long),
            prefilled=bad,
        )


def test_a_session_samples_and_stops_as_a_request_of_its_own():
    from flashmemory.runtime.sampling import Sampling

    model = tiny_model("llama")
    tok = BatchCharTokenizer(chat_template="tiny")
    session = Session(model, tok, CONTEXT, method="lsa", indexer=None, lsa=LSA)
    kw = dict(max_new_tokens=16, sampling=Sampling(temperature=1.0, seed=4))
    got = session.ask(QUESTIONS[0], **kw)
    want = generate(model, tok, build_prompt(CONTEXT, QUESTIONS[0]), method="lsa", indexer=None, lsa=LSA, **kw)
    assert got.token_ids == want.token_ids
    stop = want.text[4:6]
    stopped = session.ask(QUESTIONS[0], stop=stop, **kw)
    assert stopped.text == want.text[: want.text.find(stop)]
