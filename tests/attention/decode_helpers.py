"""Step-by-step greedy decoding that keeps the logits, shared by the equivalence tests."""

import torch

from flashmemory.attention.cache import LSACache
from flashmemory.config import LSAConfig

from ..conftest import SMALL_LSA


@torch.no_grad()
def greedy_logits(model, ids, cache, steps, on_step=None, mask_for_step=None):
    """Prefill ``ids`` then decode ``steps`` tokens greedily; returns (tokens [B, steps], logits [B, steps+1, V])."""
    out = model(input_ids=ids, past_key_values=cache, use_cache=True)
    logits = [out.logits[:, -1]]
    tokens = []
    for step in range(steps):
        tok = out.logits[:, -1:].argmax(-1)
        tokens.append(tok)
        kwargs = {}
        if mask_for_step is not None:
            kwargs["attention_mask"] = mask_for_step(step)
        out = model(input_ids=tok, past_key_values=cache, use_cache=True, **kwargs)
        logits.append(out.logits[:, -1])
        if on_step is not None:
            on_step(step)
    return torch.cat(tokens, 1), torch.stack(logits, 1)


@torch.no_grad()
def decode_recording_commits(model, ids, cache, steps):
    """Greedy decode; also the page table right after every boundary. Returns (tokens, logits, tables)."""
    committed, seen = [], 0
    out = model(input_ids=ids, past_key_values=cache, use_cache=True)
    tokens, logits = [], [out.logits[:, -1]]
    for _ in range(steps):
        tokens.append(out.logits[:, -1:].argmax(-1))
        out = model(input_ids=tokens[-1], past_key_values=cache, use_cache=True)
        if cache.stats.boundaries > seen:  # this step began with a boundary: record what it committed
            seen = cache.stats.boundaries
            committed.append(cache.store.page_table.clone())
        logits.append(out.logits[:, -1])
    return torch.cat(tokens, 1), torch.stack(logits, 1), committed


def masked_run_with_pages(model, ids, tables, *, max_pages, steps):
    """The masked path (recall at boundaries, no prefetch) forced to hold ``tables`` cycle by cycle."""
    tables = iter(tables)
    lsa = LSAConfig(budget=None, max_pages=max_pages, **SMALL_LSA)
    with LSACache(model, lsa, max_new_tokens=steps + 10, forced_pages=lambda c: next(tables)) as ref:
        return greedy_logits(model, ids, ref, steps)


def random_pages(seed):
    """A page chooser that fills every slot with random selectable pages, reproducibly for ``seed``."""
    gen = torch.Generator().manual_seed(seed)

    def forced(cache):
        n, k = cache.selectable_pages(), cache.store.layout.num_page_slots
        return torch.stack([torch.randperm(n, generator=gen)[:k] for _ in range(cache.store.batch)])

    return forced
