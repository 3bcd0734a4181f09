"""Peers from the ``kvpress`` package: its presses compress the prompt's cache once, then decoding is plain.

Each method runs a press of ``kvpress`` itself (pinned in the ``peers`` extra) at ``compression_ratio = 1 -
budget``, so it keeps the budget's fraction of the prompt's KV, and its device bytes are the compressed cache's
actual storage (evicted tokens are gone, not masked).

Two differences from what the presses expect, absorbed here rather than in a fork:

- ``kvpress/__init__.py`` wraps every attention function of transformers when it is imported, and imports
  ``datasets`` and ``fire`` for presses we do not run. We load the press modules from the installed package
  without executing that ``__init__``, so nothing is patched and no extra dependency is needed.
- transformers >= 5 no longer passes ``cache_position`` to attention modules; the presses read it to tell
  prefill from decoding. A forward pre-hook supplies it from the cache's length (absent keys only).
- The presses' own context manager compresses sliding-window layers of text-only Gemma 3 and leaves the
  rotary embedding attached to every attention module; :func:`pressed` registers the same hook on
  full-attention layers only and undoes every change on exit.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import inspect
import sys
import types
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import torch
from torch import nn

from ..models.adapter import attention_module, backbone_spec
from .kv_budget import full_kv_bytes, kept_fraction
from .method_base import Method, decode_greedy, followup_len, require_unpadded

KVPRESS_PIN = "kvpress==0.5.5"
KVPRESS_INSTALL = f"pip install --no-deps {KVPRESS_PIN}"
# name -> (module under kvpress.presses, class)
PRESSES: dict[str, tuple[str, str]] = {
    "snapkv": ("snapkv_press", "SnapKVPress"),
    "streamingllm": ("streaming_llm_press", "StreamingLLMPress"),
    "expected-attention": ("expected_attention_press", "ExpectedAttentionPress"),
    "tova": ("tova_press", "TOVAPress"),
    "keydiff": ("keydiff_press", "KeyDiffPress"),
    "knorm": ("knorm_press", "KnormPress"),
}


def load_press_class(module: str, cls: str) -> type:
    """A press class from the installed ``kvpress``, imported without running the package's ``__init__``.

    Raises:
        ModuleNotFoundError: kvpress is not installed (the message gives the install command).
    """
    if "kvpress" in sys.modules:  # already imported by the caller's own code: use it as it is
        return getattr(importlib.import_module(f"kvpress.presses.{module}"), cls)
    spec = importlib.util.find_spec("kvpress")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(f"the kvpress peers need the kvpress package: {KVPRESS_INSTALL}")
    package = types.ModuleType("kvpress")
    package.__path__ = list(spec.submodule_search_locations)
    package.__file__ = str(Path(package.__path__[0]) / "__init__.py")
    sys.modules["kvpress"] = package
    try:
        return getattr(importlib.import_module(f"kvpress.presses.{module}"), cls)
    finally:
        # Leave no half-initialised package behind: a later ``import kvpress`` runs the real __init__, which
        # finds the press modules already loaded.
        del sys.modules["kvpress"]


def _cache_position_hook(module: nn.Module, args: tuple, kwargs: dict):
    if "cache_position" in kwargs:
        return None
    cache = kwargs.get("past_key_values", kwargs.get("cache"))
    hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
    if cache is None:
        return None
    past = cache.layers[module.layer_idx].get_seq_length() if cache.layers[module.layer_idx].is_initialized else 0
    kwargs["cache_position"] = torch.arange(past, past + hidden.shape[1], device=hidden.device)
    kwargs.setdefault("past_key_values", cache)
    if "hidden_states" not in kwargs:
        kwargs["hidden_states"], args = args[0], args[1:]
    return args, kwargs


def _rotary_for(model: nn.Module, layer_type: str):
    owner = model.model.language_model if hasattr(model.model, "language_model") else model.model
    rotary = owner.rotary_emb
    if "layer_type" in inspect.signature(rotary.forward).parameters:
        # Gemma 3 keeps one rotary table per layer type; the presses call rotary_emb(x, position_ids).
        return functools.partial(rotary, layer_type=layer_type)
    return rotary


@contextmanager
def pressed(press, model: nn.Module) -> Iterator[None]:
    """Apply ``press`` to the full-attention layers of ``model`` for the duration of the block.

    This does what ``BasePress.__call__`` does (model set-up, the model's rotary embedding on each attention
    module, the press's forward hook) with three differences: sliding-window layers are left alone for every
    family, not only for multimodal Gemma 3 (a press would evict tokens their window still needs); the
    ``cache_position`` the press reads is supplied; and the model is left exactly as it was afterwards.
    """
    spec = backbone_spec(model)
    press.post_init_from_model(model)
    with ExitStack() as stack:
        for layer in spec.full_layers:
            attn = attention_module(model, layer)
            if not hasattr(attn, "rotary_emb"):
                object.__setattr__(attn, "rotary_emb", _rotary_for(model, spec.layer_types[layer]))
                stack.callback(object.__delattr__, attn, "rotary_emb")
            for handle in (
                attn.register_forward_pre_hook(_cache_position_hook, with_kwargs=True),
                attn.register_forward_hook(press.forward_hook, with_kwargs=True),
            ):
                stack.callback(handle.remove)
        yield


class KVPressMethod(Method):
    """One kvpress press, applied to the whole prompt at prefill, then plain greedy decoding.

    Args:
        name: the registry name (a key of :data:`PRESSES`).
    """

    kv_note = "kvpress-compressed cache on the device (evicted prompt tokens are dropped)"
    requires = "kvpress"
    install_hint = KVPRESS_INSTALL

    def __init__(self, name: str) -> None:
        if name not in PRESSES:
            raise ValueError(f"unknown kvpress method {name!r}; valid: {', '.join(PRESSES)}")
        self.name = name

    def make_press(self, compression_ratio: float):
        module, cls = PRESSES[self.name]
        return load_press_class(module, cls)(compression_ratio=compression_ratio)

    def run(self, model, tokenizer, input_ids, attention_mask, max_new_tokens, lsa, followup=None):
        require_unpadded(self.name, attention_mask)
        elem = next(model.parameters()).element_size()
        batch, context = input_ids.shape
        turn = followup_len(followup)
        # a follow-up turn joins the cache uncompressed: the prompt keeps less, so both hold the budget's share
        press = self.make_press(1.0 - kept_fraction(model, lsa, context, elem, turn))
        # the press compresses the prefill only: a follow-up turn finds what it kept
        with pressed(press, model):
            out, stats = decode_greedy(model, tokenizer, input_ids, attention_mask, max_new_tokens, followup)
        stats.method = self.name
        stats.kv_bytes_full = full_kv_bytes(model, batch, context + turn + stats.new_tokens, elem)
        return out, stats


__all__ = ["KVPRESS_INSTALL", "KVPRESS_PIN", "PRESSES", "KVPressMethod", "load_press_class", "pressed"]
