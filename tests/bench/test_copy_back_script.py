"""``benchmarks/copy_back.py``: its samples, its page-choice bound and its scoring, on a tiny model."""

from types import SimpleNamespace

import pytest
import torch
from transformers.cache_utils import DynamicCache

from flashmemory.config import LSAConfig
from flashmemory.models.tiny import tiny_model

from .fake_tokenizers import CharTokenizer
from .scripts import load_script


@pytest.fixture(scope="module")
def copy_back():
    return load_script("copy_back")


def test_the_prompt_holds_the_passage_far_back_and_ends_with_its_start(copy_back):
    tok = CharTokenizer()
    prompt, cont, info = copy_back.build_sample(tok, 4096, 300, seed=3)
    cue = copy_back.CUE_TOKENS
    assert len(prompt) == 4096 and len(cont) == 300
    at, start = info["passage_at"], info["copy_start"]
    passage = prompt[at : at + cue + len(cont)]
    # the earlier copy is the cue and the continuation, and the prompt ends with the cue
    assert passage[:cue] == prompt[start:] and passage[cue:] == cont
    assert start - at > 0.4 * 4096  # far from the end: only recalled pages can hold it
    assert copy_back.build_sample(tok, 4096, 300, seed=3) == (prompt, cont, info)
    assert copy_back.build_sample(tok, 4096, 300, seed=4)[0] != prompt
    with pytest.raises(ValueError, match="too little haystack"):
        copy_back.build_sample(tok, 1000, 300, seed=3)


def test_the_passage_bound_keeps_the_pages_the_copy_reads_next(copy_back):
    lsa = LSAConfig(budget=0.15, page_chunks=4)  # pages of 64 tokens
    choose = copy_back.passage_chooser(lsa, passage_at=1000, copy_start=3000)
    store = SimpleNamespace(layout=SimpleNamespace(num_page_slots=4), batch=1)
    cache = SimpleNamespace(store=store, selectable_pages=lambda: 50, lookahead_pos=torch.tensor([[3100]]))
    pages = choose(cache)
    # 100 tokens into the copy the source stands at 1100 (page 17 of 64 tokens); from 16 tokens before it on
    assert pages.tolist() == [[16, 17, 18, 19]]
    cache.lookahead_pos = torch.tensor([[6400]])  # past the selectable pages: the last four
    assert choose(cache).tolist() == [[46, 47, 48, 49]]


def test_scoring_feeds_the_continuation_one_token_per_step(copy_back):
    model = tiny_model("llama", vocab_size=256)
    prompt, cont = list(range(3, 200)), list(range(3, 40))
    nll, hits = copy_back.score_continuation(model, DynamicCache(config=model.config), prompt, cont)
    assert len(nll) == len(hits) == len(cont) and all(x >= 0 for x in nll)
    # the same as one forward pass over prompt + continuation
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([prompt + cont])).logits[0, len(prompt) - 1 : -1].float()
    ref = torch.nn.functional.cross_entropy(logits, torch.tensor(cont), reduction="none")
    torch.testing.assert_close(torch.tensor(nll), ref, rtol=1e-4, atol=1e-4)
    assert hits == (logits.argmax(-1) == torch.tensor(cont)).tolist()
