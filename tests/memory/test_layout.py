import pytest

from flashmemory.config import LSAConfig
from flashmemory.memory.layout import BudgetError, SequenceBytes, plan_layout, reserve_bytes


def test_plan_layout_respects_budget():
    cfg = LSAConfig(budget=0.25, page_chunks=4)
    seq = SequenceBytes(per_token=1024, per_chunk_key=96)
    layout = plan_layout(cfg, seq, context_len=8192, max_len=8192 + 64, other_layers_full=0)
    used = reserve_bytes(layout, seq, -(-(8192 + 64) // cfg.chunk_size))
    assert used <= 0.25 * 8192 * 1024
    assert used + cfg.page_size * 1024 > 0.25 * 8192 * 1024, "one more page would still have fit"


def test_plan_layout_bytes_budget_and_everything_fits():
    cfg = LSAConfig(budget=10**12, page_chunks=4)
    seq = SequenceBytes(per_token=1024, per_chunk_key=96)
    layout = plan_layout(cfg, seq, context_len=1000, max_len=1100, other_layers_full=0)
    assert layout.num_page_slots == -(-1100 // cfg.page_size)


def test_plan_layout_too_small_budget_says_so():
    cfg = LSAConfig(budget=0.01, page_chunks=4)
    seq = SequenceBytes(per_token=1024, per_chunk_key=96)
    with pytest.raises(BudgetError, match="Raise the budget to at least"):
        plan_layout(cfg, seq, context_len=2048, max_len=2100, other_layers_full=0)


def test_too_small_a_byte_budget_names_bytes_and_too_short_a_context_names_full_attention():
    seq = SequenceBytes(per_token=1024, per_chunk_key=96)
    with pytest.raises(BudgetError, match=r"at least [\d,]+ bytes, or lower"):
        plan_layout(LSAConfig(budget=20_000, page_chunks=4), seq, context_len=2048, max_len=2100, other_layers_full=0)
    with pytest.raises(BudgetError, match="too short for LSA with these settings: use full attention"):
        plan_layout(LSAConfig(budget=1.0, page_chunks=4), seq, context_len=40, max_len=56, other_layers_full=0)


def test_plan_layout_max_pages():
    cfg = LSAConfig(budget=None, max_pages=7, page_chunks=4)
    seq = SequenceBytes(per_token=1024, per_chunk_key=96)
    assert plan_layout(cfg, seq, context_len=4096, max_len=4200, other_layers_full=0).num_page_slots == 7


def test_a_short_answer_gives_its_unused_tail_growth_back_as_pages():
    cfg = LSAConfig(budget=0.2, page_chunks=2)
    seq = SequenceBytes(per_token=1024, per_chunk_key=96)
    short = plan_layout(cfg, seq, context_len=2048, max_len=2048 + 16, other_layers_full=0)
    long = plan_layout(cfg, seq, context_len=2048, max_len=2048 + 256, other_layers_full=0)
    assert short.tail_capacity == cfg.tail_capacity_for(16) < long.tail_capacity == cfg.tail_capacity
    # 48 growth slots fewer: at least one more 32-token page under the same cap
    assert short.num_page_slots >= long.num_page_slots + 1
    used = reserve_bytes(short, seq, -(-(2048 + 16) // cfg.chunk_size))
    assert used <= 0.2 * 2048 * 1024
