"""Shared pieces of the DeepSeek-V4 tests: a tiny model, a decode loop that keeps logits, the resident rule."""

import torch

from flashmemory.deepseek_v4.cache import deepseek_v4_lsa_config
from flashmemory.deepseek_v4.configs import tiny_deepseek_v4

# Entry units of SMALL: page = 4 entries (16 tokens), sink 1 entry, recent 4 entries, a cycle = 4 entries.
SMALL = dict(page_chunks=4, interval=16, recent=16, sink=4)


def small_lsa(**overrides):
    return deepseek_v4_lsa_config(**{**SMALL, "budget": None, "max_pages": 1000, **overrides})


MODEL = tiny_deepseek_v4()


@torch.no_grad()
def decode(m, ids, cache, steps):
    """Greedy decoding that returns tokens ``[B, steps]`` and the logits of every step ``[steps, B, V]``."""
    out = m(input_ids=ids, past_key_values=cache, use_cache=True)
    tokens, logits = [], []
    for _ in range(steps):
        logits.append(out.logits[:, -1].float())
        tok = out.logits[:, -1].argmax(-1)
        tokens.append(tok)
        out = m(input_ids=tok[:, None], past_key_values=cache, use_cache=True)
    return torch.stack(tokens, 1), torch.stack(logits)


def resident_entries(num_entries, tail_start, pages, *, sink, page):
    """The resident rule in entries: sink, the chosen pages, and everything from the tail start on."""
    keep = torch.zeros(num_entries, dtype=torch.bool)
    keep[: min(sink, num_entries)] = True
    for p in pages:
        keep[p * page : (p + 1) * page] = True
    keep[tail_start:] = True
    return keep
