"""Methods that re-select history blocks at every decode step over a full device cache (Quest, InfLLM)."""

from __future__ import annotations

from ..attention.block_select import BlockScorer, BlockSelectCache, BlockSelectConfig
from .kv_budget import full_kv_bytes, lsa_page_tokens
from .method_base import Method, decode_greedy, followup_len, require_unpadded

MASK_NOTE = "whole cache on the device (+ block metadata); per-step selection only masks attention"


class BlockSelectMethod(Method):
    """Decode through a :class:`BlockSelectCache`, attending to as many history tokens as LSA's page slots.

    Subclasses give the scorer and the block size. Budget: the same sink and recent window as LSA, plus
    ``lsa_page_tokens // block_size`` blocks per step. Physical bytes: every key and value stays on the
    device, so the method is charged the whole cache plus its block metadata.
    """

    kv_note = MASK_NOTE

    def make_scorer(self) -> BlockScorer:
        raise NotImplementedError

    def block_size(self, lsa) -> int:
        raise NotImplementedError

    def run(self, model, tokenizer, input_ids, attention_mask, max_new_tokens, lsa, followup=None):
        require_unpadded(self.name, attention_mask)
        elem = next(model.parameters()).element_size()
        batch, context = input_ids.shape
        block = self.block_size(lsa)
        turn = followup_len(followup)
        tokens = lsa_page_tokens(model, lsa, context, max_new_tokens + turn, elem)
        cfg = BlockSelectConfig(block_size=block, num_blocks=tokens // block, sink=lsa.sink, recent=lsa.recent)
        caches: list[BlockSelectCache] = []

        def factory(m):
            caches.append(BlockSelectCache(m, cfg, self.make_scorer()))
            return caches[-1]

        try:
            out, stats = decode_greedy(
                model, tokenizer, input_ids, attention_mask, max_new_tokens, followup, cache_factory=factory
            )
        finally:
            for cache in caches:
                cache.close()
        cache = caches[-1]
        stats.method = self.name
        stats.kv_bytes_device = max(cache.peak_device_bytes, cache.device_kv_bytes())
        stats.kv_bytes_full = full_kv_bytes(model, batch, context + turn + stats.new_tokens, elem)
        stats.page_slots = cfg.num_blocks
        return out, stats


__all__ = ["MASK_NOTE", "BlockSelectMethod"]
