"""Sampling (temperature, top-k, top-p, seed) and stop strings, on their own and through generate."""

import pytest
import torch

from flashmemory.config import LSAConfig
from flashmemory.models.tiny import tiny_model
from flashmemory.runtime.generate import generate
from flashmemory.runtime.sampling import Sampling, StopText, TextStream, cut_at_stop, held_back, sample

from ..bench.fake_tokenizers import BatchCharTokenizer
from ..conftest import SMALL_LSA

PROBS = torch.tensor([0.5, 0.3, 0.2])
LOGITS = PROBS.log().repeat(20000, 1)


def _freq(tokens: torch.Tensor) -> torch.Tensor:
    return torch.bincount(tokens, minlength=3).float() / tokens.numel()


@pytest.mark.parametrize(
    ("kw", "want"),
    [
        (dict(temperature=1.0), [0.5, 0.3, 0.2]),
        (dict(temperature=1.0, top_k=2), [0.625, 0.375, 0.0]),
        # 0.5 has not reached 0.6, so the second token stays; 0.8 has, so the third goes
        (dict(temperature=1.0, top_p=0.6), [0.625, 0.375, 0.0]),
        (dict(temperature=1.0, top_p=0.4), [1.0, 0.0, 0.0]),
        (dict(temperature=1.0, top_k=1), [1.0, 0.0, 0.0]),
    ],
)
def test_draws_follow_the_softmax_cut_by_top_k_and_top_p(kw, want):
    gen = torch.Generator().manual_seed(0)
    got = _freq(sample(LOGITS, Sampling(**kw), gen))
    torch.testing.assert_close(got, torch.tensor(want), atol=0.015, rtol=0)


def test_temperature_sharpens_and_flattens():
    gen = torch.Generator().manual_seed(1)
    cold = _freq(sample(LOGITS, Sampling(temperature=0.25), gen))
    hot = _freq(sample(LOGITS, Sampling(temperature=4.0), gen))
    p_cold = PROBS.pow(4) / PROBS.pow(4).sum()
    p_hot = PROBS.pow(0.25) / PROBS.pow(0.25).sum()
    torch.testing.assert_close(cold, p_cold, atol=0.015, rtol=0)
    torch.testing.assert_close(hot, p_hot, atol=0.015, rtol=0)


@pytest.mark.parametrize(
    "kw", [dict(temperature=-0.1), dict(temperature=101), dict(top_p=0.0), dict(top_p=1.5), dict(top_k=-1)]
)
def test_out_of_range_settings_are_refused(kw):
    with pytest.raises(ValueError, match=next(iter(kw))):
        Sampling(**kw)


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama")


PROMPT = "".join(chr(97 + (i * 5) % 26) for i in range(500))


@pytest.mark.parametrize("method", ["lsa", "full"])
def test_a_seed_repeats_a_sampled_answer_and_greedy_is_the_default(model, method):
    tok = BatchCharTokenizer()
    kw = dict(method=method, indexer=None, lsa=LSAConfig(budget=0.3, **SMALL_LSA), max_new_tokens=24, chat=False)
    a = generate(model, tok, PROMPT, sampling=Sampling(temperature=1.0, seed=7), **kw)
    b = generate(model, tok, PROMPT, sampling=Sampling(temperature=1.0, seed=7), **kw)
    c = generate(model, tok, PROMPT, sampling=Sampling(temperature=1.0, seed=8), **kw)
    assert a.token_ids == b.token_ids and a.token_ids != c.token_ids
    greedy = generate(model, tok, PROMPT, **kw)
    assert greedy.token_ids == generate(model, tok, PROMPT, sampling=Sampling(), **kw).token_ids
    assert greedy.token_ids != a.token_ids  # a random tiny model's softmax is flat: a sample is not the argmax


def test_an_answer_ends_before_its_first_stop_string(model):
    tok = BatchCharTokenizer()
    kw = dict(method="full", max_new_tokens=30, chat=False)
    whole = generate(model, tok, PROMPT, **kw)
    text = whole.text
    assert len(text) == 30  # one character per token, no end-of-text in 30 steps
    stop = text[8:10]
    first = text.find(stop)
    got = generate(model, tok, PROMPT, stop=[stop, "\x00never"], **kw)
    assert got.text == text[:first]
    assert got.token_ids[0] == whole.token_ids[0][: first + len(stop)]  # through the token that completed it
    assert got.stats.new_tokens == first + len(stop)  # decoding stopped there
    assert generate(model, tok, PROMPT, stop="\x00never", **kw).text == text


def test_stop_strings_are_per_row_and_skip_rows_already_finished():
    tok = BatchCharTokenizer()
    stop = StopText(tok, [["cd"], []])
    ended = [stop.update(torch.tensor([ord(a), ord(b)])) for a, b in zip("abcde", "abcde", strict=True)]
    assert [e.tolist() for e in ended] == [[False, False]] * 3 + [[True, False], [False, False]]
    assert stop.cut(0, [97, 98, 99, 100, 101], "abcde") == ([97, 98, 99, 100], "ab", True)
    assert stop.cut(1, [97, 98], "ab") == ([97, 98], "ab", False)
    # a row that ended at an end-of-text token only repeats it: nothing after it is read
    late = StopText(tok, [["x"]])
    late.update(torch.tensor([1]), finished=torch.tensor([True]))
    assert late.ids == [[]]
    with pytest.raises(ValueError, match="empty"):
        StopText(tok, [[""]])


def test_text_a_stream_must_hold_back():
    assert cut_at_stop("hello world", ["wor", "lo"]) == "hel"
    assert cut_at_stop("hello", ["x"]) == "hello"
    assert held_back("hello wo", ["world"]) == 2
    assert held_back("hello w", ["world", "xyz"]) == 1
    assert held_back("hello", ["world"]) == 0
    assert held_back("abcab", ["abcabd"]) == 5
    assert held_back("", ["a"]) == 0


class _Utf8Bytes:
    """One token per UTF-8 byte, so a character can be split across tokens."""

    def decode(self, ids, skip_special_tokens=True):
        return bytes(ids).decode("utf-8", errors="replace")


def test_a_text_stream_never_shows_half_a_character_nor_part_of_a_stop_string():
    tokens = list("naïve END tail".encode())
    stream = TextStream(_Utf8Bytes(), ["END"])
    pieces = [stream.push(t) for t in tokens]
    assert "".join(pieces) == "naïve "  # "E", "EN" were held back, and after "END" nothing more comes
    assert all("\ufffd" not in p for p in pieces) and pieces[2] == "" and pieces[3] == "ï"
    assert stream.finish("naïve ") == ""
    # text held back at the end that turned out not to be a stop string is shown when the answer is whole
    stream = TextStream(_Utf8Bytes(), ["END"])
    assert "".join(stream.push(t) for t in b"so EN") == "so "
    assert stream.finish("so EN") == "EN"


@pytest.mark.cuda
@pytest.mark.parametrize("cuda_graph", [False, True], ids=["eager", "graph"])
def test_sampling_and_stop_strings_on_the_cuda_fast_path_cuda(cuda_graph):
    model = tiny_model("llama").cuda()
    tok = BatchCharTokenizer()
    lsa = LSAConfig(budget=0.3, **SMALL_LSA)
    kw = dict(method="lsa", indexer=None, lsa=lsa, max_new_tokens=40, chat=False, cuda_graph=cuda_graph)
    seeded = Sampling(temperature=1.0, top_k=40, seed=3)
    a = generate(model, tok, PROMPT * 4, sampling=seeded, **kw)
    b = generate(model, tok, PROMPT * 4, sampling=seeded, **kw)
    assert a.token_ids == b.token_ids and a.stats.boundaries >= 2
    assert a.stats.kv_ratio <= 0.3
    text = generate(model, tok, PROMPT * 4, **kw).text
    stop = text[12:14]
    got = generate(model, tok, PROMPT * 4, stop=stop, **kw)
    assert got.text == text[: text.find(stop)]
