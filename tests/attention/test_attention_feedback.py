import pytest
import torch

from flashmemory.attention.cache import LSACache
from flashmemory.attention.fast_path import build_lsa_cache
from flashmemory.config import LSAConfig
from flashmemory.dump.capture import LabelConfig, capture_prompt
from flashmemory.dump.labels import from_csr
from flashmemory.indexer.checkpoint import load_indexer, save_indexer
from flashmemory.indexer.feedback import FeedbackSpec, logit_of
from flashmemory.indexer.memory_indexer import MemoryIndexer
from flashmemory.models.tiny import tiny_model

from ..conftest import SMALL_LSA
from .decode_helpers import greedy_logits

LABELS = LabelConfig(chunk_size=8, top_p=0.6, min_layers=2)
SPEC = FeedbackSpec(window=32, top_p=LABELS.top_p, min_layers=LABELS.min_layers)


def _fields(cfg: LSAConfig) -> dict:
    from dataclasses import fields

    return {f.name: getattr(cfg, f.name) for f in fields(cfg)}


def feedback_indexer(model) -> MemoryIndexer:
    indexer = MemoryIndexer.from_model(model, (1,), chunk_size=LABELS.chunk_size)
    indexer.add_feedback(SPEC)
    return indexer


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_runtime_counts_the_consensus_the_dump_labels(family):
    """With every page resident, LSA attends like full attention: the runtime's prompt-window and per-step
    consensus must be the dump's golden sets, row for row."""
    model = tiny_model(family)
    ids = torch.randint(0, model.config.vocab_size, (1, 203), generator=torch.Generator().manual_seed(5))
    steps = 20
    rec = capture_prompt(
        model, ids, targets=(1,), labels=LABELS, max_new_tokens=steps, eos_token_id=[], feedback_window=SPEC.window
    )
    golden = from_csr(rec)
    prefix = from_csr({k.removeprefix("prefix_"): v for k, v in rec.items() if k.startswith("prefix_")})
    n0 = ids.shape[1] // LABELS.chunk_size
    expected_prompt = torch.zeros(n0, dtype=torch.long)
    for row in [*prefix, golden[0]]:
        expected_prompt[row] += 1

    lsa = LSAConfig(budget=None, max_pages=10_000, target_layers=(1,), **SMALL_LSA)
    observed = []
    with LSACache(model, lsa, feedback_indexer(model), max_new_tokens=steps + 4) as cache:
        tokens, _ = greedy_logits(model, ids, cache, steps, on_step=lambda s: observed.append(cache.feedback.steps[-1]))
        assert cache.feedback.prompt_rows == SPEC.window
        assert torch.equal(cache.feedback.prompt_hits[0], expected_prompt)
    assert tokens[0].tolist() == rec["tokens"][ids.shape[1] :].tolist()
    for s, (agreed, seen) in enumerate(observed, start=1):
        assert seen.all()  # every chunk was resident
        assert agreed[0].nonzero().flatten().tolist() == golden[s].tolist()
    assert any(len(g) for g in golden[1:])


def test_boundary_scores_come_from_the_head():
    model = tiny_model("llama")
    ids = torch.randint(0, model.config.vocab_size, (1, 240), generator=torch.Generator().manual_seed(2))
    indexer = feedback_indexer(model)
    with torch.no_grad():
        indexer.feedback.net[-1].bias.fill_(-30.0)  # a head that rules every chunk out
    lsa = LSAConfig(budget=None, max_pages=3, target_layers=(1,), **SMALL_LSA)
    tables = {}
    for name, cfg in (("feedback", lsa), ("tower", LSAConfig(**{**_fields(lsa), "attention_feedback": False}))):
        with LSACache(model, cfg, indexer, max_new_tokens=30) as cache:
            seen = []

            def record(step, cache=cache, seen=seen):
                seen.append((cache.stats.boundaries, cache.store.page_table.clone(), cache.last_scores.clone()))

            greedy_logits(model, ids, cache, SMALL_LSA["interval"] + 2, on_step=record)
            tables[name] = seen
            assert (cache.feedback is None) == (name == "tower")
    first_fb, first_tower = tables["feedback"][0], tables["tower"][0]
    # the turn's first boundary: the tower alone chooses, head or not
    assert torch.equal(first_fb[1], first_tower[1]) and torch.equal(first_fb[2], first_tower[2])
    later_fb, later_tower = tables["feedback"][-1], tables["tower"][-1]
    assert later_fb[0] == 2  # a second boundary happened
    assert float(later_fb[2].max()) < 1e-6 < float(later_tower[2].max())  # there the head's scores rank


def test_fast_path_leaves_the_head_out_unless_feedback_is_asked_for():
    model = tiny_model("llama")
    indexer = feedback_indexer(model)
    base = dict(budget=None, max_pages=3, target_layers=(1,), **SMALL_LSA)
    fast = build_lsa_cache(model, LSAConfig(attention_backend="torch", **base), indexer)
    assert type(fast) is not LSACache and fast.feedback is None  # the fast path keeps its speed
    fast.close()
    with pytest.raises(ValueError, match="attention_feedback=True"):
        build_lsa_cache(model, LSAConfig(attention_backend="torch", attention_feedback=True, **base), indexer)
    for flag in (None, True):  # on a CPU "auto" is the mask backend anyway; True asks for it everywhere
        auto = build_lsa_cache(model, LSAConfig(attention_feedback=flag, **base), indexer)
        assert type(auto) is LSACache and auto.feedback is not None
        auto.close()
    off = build_lsa_cache(model, LSAConfig(attention_feedback=False, **base), indexer)
    assert off.feedback is None
    off.close()


def test_feedback_head_survives_a_checkpoint_round_trip(tmp_path):
    indexer = feedback_indexer(tiny_model("llama"))
    with torch.no_grad():
        indexer.feedback.net[0].weight.normal_()
    save_indexer(indexer, tmp_path / "ck")
    back = load_indexer(tmp_path / "ck")
    assert back.feedback_spec == SPEC
    x = torch.randn(3, 7, 8)
    torch.testing.assert_close(back.feedback(x), indexer.feedback(x))
    plain = MemoryIndexer.from_model(tiny_model("llama"), (1,), chunk_size=8)
    save_indexer(plain, tmp_path / "plain")
    assert load_indexer(tmp_path / "plain").feedback is None


def test_logit_of_is_finite_at_the_ends():
    z = logit_of(torch.tensor([0.0, 0.5, 1.0]))
    assert torch.isfinite(z).all() and float(z[1]) == 0.0


def test_tower_slots_keep_the_towers_best_page_that_the_head_ranks_last():
    from flashmemory.indexer.scoring import select_pages

    head = torch.tensor([[0.9, 0.9, 0.8, 0.8, 0.7, 0.7, 0.1, 0.1]])  # pages of 2 chunks: head likes pages 0, 1, 2
    tower = torch.tensor([[0.1, 0.1, 0.2, 0.2, 0.1, 0.1, 0.9, 0.1]])  # the tower's best chunk is in page 3
    kw = dict(num_selectable=4, page_chunks=2, num_slots=2, threshold=0.5)
    assert select_pages(head, top_m=1, **kw).tolist() == [[0, 1]]
    assert select_pages(head, top_m=1, best_scores=tower, **kw).tolist() == [[0, 3]]
