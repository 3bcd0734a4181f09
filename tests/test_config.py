import pytest

from flashmemory.config import LSAConfig


@pytest.mark.parametrize(
    "kwargs, match",
    [
        pytest.param({"chunk_size": 0}, "chunk_size", id="chunk0"),
        pytest.param({"interval": 20}, "multiple of chunk_size", id="interval-not-multiple"),
        pytest.param({"threshold": 1.0}, "threshold", id="threshold"),
        pytest.param({"budget": 0.0}, "budget", id="budget0"),
        pytest.param({"budget": -1.0}, "budget", id="budget-negative"),
        pytest.param({"budget": 1.5}, "whole number of bytes", id="budget-fraction-above-one"),
        pytest.param({"budget": None}, "max_pages", id="no-budget"),
        pytest.param({"recent": -1}, "recent", id="recent"),
        pytest.param({"layer_reduce": "sum"}, "layer_reduce", id="reduce"),
        pytest.param({"target_layers": ()}, "target_layers", id="targets-empty"),
        pytest.param({"first_boundary_keys": "tokens"}, "first_boundary_keys", id="first-boundary-keys"),
        pytest.param({"token_keys_from": -1}, "token_keys_from", id="token-keys-from"),
        pytest.param({"later_boundary_keys": "tokens"}, "later_boundary_keys", id="later-boundary-keys"),
        pytest.param({"later_boundary_keys": "token", "prefetch_steps": 8}, "prefetch_steps=0", id="later-prefetch"),
    ],
)
def test_lsa_config_rejects(kwargs, match):
    with pytest.raises(ValueError, match=match):
        LSAConfig(**kwargs)


def test_lsa_config_derived_sizes():
    cfg = LSAConfig(chunk_size=16, page_chunks=4, interval=64, recent=64)
    assert cfg.page_size == 64
    assert cfg.tail_capacity == 64 + 63 + 64
    # a request that writes fewer tokens than a cycle reserves growth for those tokens only
    assert cfg.tail_capacity_for(16) == 64 + 63 + 16
    assert cfg.tail_capacity_for(1000) == cfg.tail_capacity
    assert cfg.tail_capacity_for(0) == 64 + 63 + 1
    assert LSAConfig(target_layers=[3, 5]).target_layers == (3, 5)


def test_an_unset_page_size_is_the_backbones():
    unset = LSAConfig()
    assert unset.page_chunks is None
    with pytest.raises(ValueError, match="page_chunks is unset"):
        _ = unset.page_size
    assert unset.with_page_chunks(2).page_size == 32
    assert LSAConfig(page_chunks=4).with_page_chunks(2).page_size == 64  # a size that is set stays
    with pytest.raises(ValueError, match="page_chunks"):
        LSAConfig(page_chunks=0)


def test_first_boundary_scores_tokens_from_a_prompt_length_in_auto_mode():
    auto = LSAConfig(token_keys_from=1000)
    assert auto.first_boundary_keys == "auto"
    assert [auto.scores_tokens_first(n, backbone_from=5) for n in (999, 1000, 50_000)] == [False, True, True]
    backbone = LSAConfig()  # token_keys_from=None: the backbone's own threshold
    assert [backbone.scores_tokens_first(n, backbone_from=5) for n in (4, 5)] == [False, True]
    assert LSAConfig(token_keys_from=0).scores_tokens_first(1, backbone_from=10**6)
    assert not LSAConfig(first_boundary_keys="chunk", token_keys_from=1).scores_tokens_first(50_000, 0)
    assert LSAConfig(first_boundary_keys="token").scores_tokens_first(1, 10**6)


def test_overrides_set_typed_values_and_keep_the_rest():
    from flashmemory.config import LSAConfig, with_overrides

    base = LSAConfig(budget=0.15)
    cfg = with_overrides(base, ["follow_chunks=1", "query-window=64", "target_layers=12,16", "layer_reduce=mean"])
    assert (cfg.follow_chunks, cfg.query_window, cfg.target_layers, cfg.layer_reduce) == (1, 64, (12, 16), "mean")
    assert cfg.budget == 0.15 and cfg.chunk_size == base.chunk_size
    assert with_overrides(base, []) == base
