import pytest
import torch
from transformers.cache_utils import DynamicCache

from flashmemory.deepseek_v4 import DeepseekV4LSACache, generate_ids
from flashmemory.deepseek_v4.spec import native_indexer

from .helpers import MODEL, SMALL, decode, resident_entries, small_lsa

PROMPT, STEPS = 203, 40  # 50 entries after prefill, 3 leftover tokens; 40 steps cross two cycle boundaries


def prompt_ids(batch=2, length=PROMPT, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 256, (batch, length), generator=g)


def test_every_entry_resident_is_token_identical_to_stock():
    ids = prompt_ids()
    ref_tokens, ref_logits = decode(MODEL, ids, DynamicCache(config=MODEL.config), STEPS)
    with DeepseekV4LSACache(MODEL, small_lsa(), max_new_tokens=STEPS) as cache:
        tokens, logits = decode(MODEL, ids, cache, STEPS)
        assert cache.stats.boundaries == 3
        assert cache.store.layout.num_page_slots * 4 >= (PROMPT + STEPS) // 4  # every page fits
    assert torch.equal(tokens, ref_tokens)
    torch.testing.assert_close(logits, ref_logits, atol=1e-5, rtol=0)


def test_transformers_generate_with_the_cache_matches_the_decode_loop():
    ids = prompt_ids(batch=1)
    ref, _ = generate_ids(MODEL, ids, method="full", max_new_tokens=20)
    with DeepseekV4LSACache(MODEL, small_lsa(), max_new_tokens=20) as cache:
        out = MODEL.generate(ids, past_key_values=cache, max_new_tokens=20, do_sample=False)
    assert torch.equal(out[:, ids.shape[1] :], ref)


FORCED = {0: [1, 3], 1: [2]}  # pages per sequence; sequence 1 has fewer resident entries (padded slots)


def forced(cache):
    k = cache.store.layout.num_page_slots
    rows = [pages + [-1] * (k - len(pages)) for pages in FORCED.values()]
    return torch.tensor(rows)


class MaskedReference:
    """Hooks on transformers' own cache that score non-resident entries -inf, the reference LSA must match."""

    def __init__(self, model, prompt_len):
        self.tokens = prompt_len
        self.decoding = False
        self.tail_start = None
        self.page, self.sink, self.recent = SMALL["page_chunks"], SMALL["sink"] // 4, SMALL["recent"] // 4
        self.picks = []
        self.handles = []
        for layer in (1, 3, 4):
            native = native_indexer(model, layer)
            self.handles.append(native.scorer.register_forward_hook(self.mask))
            self.handles.append(native.register_forward_hook(self.drop))

    def step(self, s):
        """Called before decode step ``s``: the runtime's boundary rule for the recent tail."""
        entries = self.tokens // 4
        if s == 0:
            self.tail_start = max(0, (entries - self.recent) // self.page * self.page)
        elif s % SMALL["interval"] == 0:
            self.tail_start = max(0, (entries - self.recent) // self.page * self.page)
        self.tokens += 1
        self.decoding = True

    def resident(self, num_entries):
        rows = [
            resident_entries(num_entries, self.tail_start, pages, sink=self.sink, page=self.page)
            for pages in FORCED.values()
        ]
        return torch.stack(rows)

    def mask(self, module, args, scores):
        if self.decoding:
            return scores.masked_fill(~self.resident(scores.shape[-1])[:, None, :], float("-inf"))

    def drop(self, module, args, picks):
        if self.decoding:
            keep = self.resident(args[3].layers[args[4]].entry_count["indexer"])
            ok = keep.gather(1, picks.clamp(min=0).flatten(1)).view_as(picks) & (picks >= 0)
            out = torch.where(ok, picks, -1)
            self.picks.append(out.clone())
            return out

    def remove(self):
        for h in self.handles:
            h.remove()


@torch.no_grad()
def test_forced_resident_set_matches_masked_reference_and_topk_stays_resident():
    ids = prompt_ids()
    ref = MaskedReference(MODEL, PROMPT)
    cache_ref = DynamicCache(config=MODEL.config)
    out = MODEL(input_ids=ids, past_key_values=cache_ref, use_cache=True)
    ref_tokens, ref_logits = [], []
    for s in range(STEPS):
        ref_logits.append(out.logits[:, -1])
        tok = out.logits[:, -1].argmax(-1)
        ref_tokens.append(tok)
        ref.step(s)
        out = MODEL(input_ids=tok[:, None], past_key_values=cache_ref, use_cache=True)
    ref.remove()

    cache = DeepseekV4LSACache(MODEL, small_lsa(max_pages=2), max_new_tokens=STEPS, forced_pages=forced)
    seen = []

    def record(module, args, picks):  # runs after the cache's own hooks: the picks attention will use
        if cache.in_decode:
            entries = cache.store.resident_entries()
            seen.append(torch.where(picks >= 0, entries.gather(1, picks.clamp(min=0).flatten(1)).view_as(picks), -1))

    handles = [native_indexer(MODEL, layer).register_forward_hook(record) for layer in (1, 3, 4)]
    try:
        tokens, logits = decode(MODEL, ids, cache, STEPS)
    finally:
        for h in handles:
            h.remove()
        cache.close()
    assert torch.equal(tokens, torch.stack(ref_tokens, 1))
    torch.testing.assert_close(logits, torch.stack(ref_logits), atol=1e-5, rtol=0)
    assert len(seen) == len(ref.picks) == 3 * STEPS
    for mine, theirs in zip(seen, ref.picks, strict=True):
        assert torch.equal(mine.sort(-1).values, theirs.sort(-1).values)
    # the restriction is real: index_topk (8) is below the resident count, and sequence 1 has padded slots
    assert cache.store.num_resident > MODEL.config.index_topk
    assert not bool(cache.store.order_on(torch.device("cpu"))[1][1].all())


def test_indexer_chooses_pages_at_boundaries_only_within_fewer_bytes():
    ids = prompt_ids(batch=1)
    with DeepseekV4LSACache(MODEL, small_lsa(max_pages=3), max_new_tokens=STEPS) as cache:
        decode(MODEL, ids, cache, STEPS)
        log, stats = cache.store.log, cache.stats
        assert stats.boundaries == 3 and len(stats.above_threshold) == 3  # the indexer chose at every boundary
        assert log.copy_steps and all(s % 4 == 0 for s in log.copy_steps)  # the store counts entries: 4 per cycle
        assert cache.last_scores.shape[1] == cache.chunk_keys.num_chunks == cache.store.flushed_len
        assert cache.store.num_resident < cache.store.seq_len
        assert stats.peak_device_bytes < cache.full_kv_bytes()
        assert cache.host_kv_bytes() > 0


def test_padding_and_bad_settings_are_refused():
    ids = prompt_ids(batch=2, length=40)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    with DeepseekV4LSACache(MODEL, small_lsa(), max_new_tokens=4) as cache:
        with pytest.raises(ValueError, match="unpadded"):
            MODEL(input_ids=ids, attention_mask=mask, past_key_values=cache)
    with pytest.raises(ValueError, match="chunk_size must be the CSA rate"):
        DeepseekV4LSACache(MODEL, small_lsa(chunk_size=8))
    with pytest.raises(ValueError, match="multiple of the CSA rate"):
        DeepseekV4LSACache(MODEL, small_lsa(recent=18))
    with pytest.raises(ValueError, match="not CSA layers"):
        DeepseekV4LSACache(MODEL, small_lsa(target_layers=(2,)))
    with pytest.raises(ValueError, match="first_boundary_keys must be 'chunk'"):
        DeepseekV4LSACache(MODEL, small_lsa(first_boundary_keys="token"))


def test_an_unset_page_size_takes_the_deepseek_page():
    """``LSAConfig.page_chunks=None`` means the backbone's size: 64 entries here, as deepseek_v4_lsa_config sets."""
    from flashmemory.config import LSAConfig

    lsa = LSAConfig(chunk_size=4, interval=16, recent=16, sink=4, budget=None, max_pages=1000)
    assert lsa.page_chunks is None
    with DeepseekV4LSACache(MODEL, lsa, max_new_tokens=8) as cache:
        decode(MODEL, prompt_ids(batch=1), cache, 8)
        assert cache.lsa.page_chunks == 64 and cache.lsa.page_size == 256
