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
        pytest.param({"budget": None}, "max_pages", id="no-budget"),
        pytest.param({"recent": -1}, "recent", id="recent"),
        pytest.param({"layer_reduce": "sum"}, "layer_reduce", id="reduce"),
        pytest.param({"target_layers": ()}, "target_layers", id="targets-empty"),
        pytest.param({"first_boundary_keys": "tokens"}, "first_boundary_keys", id="first-boundary-keys"),
    ],
)
def test_lsa_config_rejects(kwargs, match):
    with pytest.raises(ValueError, match=match):
        LSAConfig(**kwargs)


def test_lsa_config_derived_sizes():
    cfg = LSAConfig(chunk_size=16, page_chunks=4, interval=64, recent=64)
    assert cfg.page_size == 64
    assert cfg.tail_capacity == 64 + 63 + 64
    assert LSAConfig(target_layers=[3, 5]).target_layers == (3, 5)


def test_overrides_set_typed_values_and_keep_the_rest():
    from flashmemory.config import LSAConfig, with_overrides

    base = LSAConfig(budget=0.15)
    cfg = with_overrides(base, ["follow_chunks=1", "query-window=64", "target_layers=12,16", "layer_reduce=mean"])
    assert (cfg.follow_chunks, cfg.query_window, cfg.target_layers, cfg.layer_reduce) == (1, 64, (12, 16), "mean")
    assert cfg.budget == 0.15 and cfg.chunk_size == base.chunk_size
    assert with_overrides(base, []) == base
