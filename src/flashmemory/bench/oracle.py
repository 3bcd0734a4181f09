"""Oracle upper bound: LSA's reserve filled with the pages full attention will actually attend to.

Before decoding, the prompt is decoded once with full attention while recording golden chunks per step, with
the label definition the indexer is trained on (``dump/labels.py``: per layer the top-p chunks by attention
mass, golden where ``min_layers`` layers agree). At each cycle boundary the oracle then makes resident the
pages holding the best golden chunks of the next ``interval`` steps, and decodes through the same
:class:`LSACache` and budget as LSA.

What it knows that LSA cannot: the future attention of full attention's own greedy continuation. Once the
oracle's output departs from that continuation, its labels describe tokens it did not generate; the bound is
then loose. The recording pass is not counted in its time or bytes.
"""

from __future__ import annotations

import dataclasses

import torch

from ..attention.cache import LSACache
from ..dump.capture import LabelConfig, capture_prompt
from ..dump.labels import from_csr
from ..models.adapter import backbone_spec
from .method_base import require_unpadded, stop_ids
from .page_methods import RESERVE_NOTE, LSAMethod, PageChooser, pad_slots


def golden_page_chooser(golden: list[torch.Tensor], hits: list[torch.Tensor], interval: int) -> PageChooser:
    """A chooser that ranks pages by their best golden chunk over the coming ``interval`` steps.

    A page's rank is the most layers that agreed on any one of its chunks at any of those steps, then the
    total of those agreements, then recency. The best chunk first, as LSA ranks pages: a page holding one
    sharply attended chunk (a needle) must beat pages with many weakly attended ones.

    Args:
        golden: golden chunk ids per step (step 0 is the last prompt token, step ``s`` the ``s``-th decode).
        hits: layers agreeing on each of those chunks, same layout.
        interval: decode steps one boundary's choice serves.

    Returns:
        ``(cache) -> [1, K]`` page ids; pages without golden chunks fill the rest, newest first.
    """

    def choose(cache: LSACache) -> torch.Tensor:
        store = cache.store
        k, selectable, chunks = store.layout.num_page_slots, cache.selectable_pages(), cache.lsa.page_chunks
        step = store.step  # decode forwards done; this choice serves steps step+1 .. step+interval
        best = torch.zeros(selectable, dtype=torch.float64)
        total = torch.zeros(selectable, dtype=torch.float64)
        window = slice(step + 1, step + 1 + interval)
        for ids, count in zip(golden[window], hits[window], strict=True):
            pages = ids.long() // chunks
            ok = pages < selectable
            best.scatter_reduce_(0, pages[ok], count[ok].double(), reduce="amax")
            total.index_add_(0, pages[ok], count[ok].double())
        recency = (torch.arange(selectable, dtype=torch.float64) + 1) / (selectable + 1)  # < 1: breaks ties only
        # Agreement counts are integers below 1e6 per page and window, so the three keys never mix.
        order = torch.argsort(best * 1e12 + total * 1e3 + recency * 1e2, descending=True)
        return pad_slots(order[None, :k].long(), k)

    return choose


class OracleChunks(LSAMethod):
    """Upper bound: the LSA reserve holds the pages that full attention attends to next.

    Args:
        labels: golden-chunk definition; its chunk size (and sink and recent window) are replaced by LSA's.
            Default: ``LabelConfig()``.
    """

    kv_note = RESERVE_NOTE + "; pages picked from full attention's future attention (an upper bound)"

    def __init__(self, labels: LabelConfig | None = None) -> None:
        super().__init__("oracle", "zero-shot")
        self.labels = labels or LabelConfig()

    def run(self, model, tokenizer, input_ids, attention_mask, max_new_tokens, lsa, followup=None):
        if followup is not None:
            raise ValueError("method 'oracle' labels the steps after one prefill; it does not take a follow-up turn")
        if input_ids.shape[0] != 1:
            raise ValueError("method 'oracle' records golden chunks of one prompt at a time; use batch size 1")
        require_unpadded(self.name, attention_mask)
        # Same chunks as the reserve; where labels know the always-resident sink and tail, LSA's own sizes.
        names = {f.name for f in dataclasses.fields(LabelConfig)}
        same = {k: getattr(lsa, k) for k in ("chunk_size", "sink", "recent") if k in names}
        labels = dataclasses.replace(self.labels, **same)
        targets = lsa.target_layers or backbone_spec(model).default_target_layers()
        device = next(model.parameters()).device
        record = capture_prompt(
            model,
            input_ids.to(device),
            targets=tuple(targets),
            labels=labels,
            max_new_tokens=max_new_tokens,
            eos_token_id=stop_ids(tokenizer),
        )
        golden = from_csr(record)
        ptr = record["indptr"].tolist()
        hits = [record["hits"][ptr[i] : ptr[i + 1]].long() for i in range(len(ptr) - 1)]
        chooser = golden_page_chooser(golden, hits, lsa.interval)
        return self.decode(model, tokenizer, input_ids, attention_mask, max_new_tokens, lsa, chooser)


__all__ = ["OracleChunks", "golden_page_chooser"]
