"""The bar over the decoder layers during a long prefill: shown for long forwards only, gone with its hooks."""

import io

import pytest
import torch
from rich.console import Console

from flashmemory.models.adapter import decoder_layers
from flashmemory.models.tiny import tiny_model
from flashmemory.runtime.prefill_progress import PrefillProgress


def _console() -> tuple[Console, io.StringIO]:
    out = io.StringIO()
    return Console(file=out, force_terminal=True, width=100), out


def test_a_long_forward_shows_its_layers_and_a_short_one_nothing():
    model = tiny_model("llama")
    layers = len(decoder_layers(model))
    console, out = _console()
    with PrefillProgress(model, min_tokens=64, console=console) as bar, torch.no_grad():
        model(input_ids=torch.randint(3, 250, (1, 32)))
        assert out.getvalue() == "" and bar._progress is None
        model(input_ids=torch.randint(3, 250, (1, 100)))
        assert bar._progress is None  # stopped when the last layer was done
    shown = out.getvalue()
    assert "prefill of 100 tokens" in shown and f"{layers}/{layers}" in shown
    assert all(not layer._forward_pre_hooks and not layer._forward_hooks for layer in decoder_layers(model))


def test_answers_are_the_same_with_the_bar():
    model = tiny_model("llama")
    ids = torch.randint(3, 250, (1, 120))
    with torch.no_grad():
        want = model(input_ids=ids).logits
        with PrefillProgress(model, min_tokens=64, console=_console()[0]):
            got = model(input_ids=ids).logits
    assert torch.equal(got, want)


@pytest.mark.cuda
def test_the_bar_follows_a_prefill_on_cuda_and_changes_nothing_cuda():
    model = tiny_model("llama").cuda()
    ids = torch.randint(3, 250, (1, 300), device="cuda")
    console, out = _console()
    with torch.no_grad():
        want = model(input_ids=ids).logits
        with PrefillProgress(model, min_tokens=64, console=console):
            got = model(input_ids=ids).logits
    assert torch.equal(got, want) and "prefill of 300 tokens" in out.getvalue()
