import pytest

import flashmemory.indexer.shipped as shipped
from flashmemory.indexer.checkpoint import CheckpointError, checkpoint_identity, save_indexer
from flashmemory.indexer.memory_indexer import MemoryIndexer
from flashmemory.models import model_fingerprint, tiny_model


def test_auto_picks_the_checkpoint_with_the_models_fingerprint(tmp_path, monkeypatch):
    model = tiny_model("llama")
    trained = MemoryIndexer.from_model(model, (2, 3), chunk_size=16, fingerprint=model_fingerprint(model))
    trained.tower.score_bias.data.fill_(-3.0)
    save_indexer(trained, tmp_path / "tiny-llama")
    monkeypatch.setattr(shipped, "SHIPPED_DIR", tmp_path)
    found = shipped.resolve_indexer(model, "auto")
    assert found is not None and float(found.tower.score_bias[0].detach()) == -3.0
    assert shipped.resolve_indexer(model, "zero-shot") is None
    label = shipped.shipped_identity(model)
    assert label.startswith("tiny-llama@") and len(label) == len("tiny-llama@") + 12
    trained.tower.score_bias.data.fill_(-2.0)  # retrained under the same name: another label
    save_indexer(trained, tmp_path / "tiny-llama")
    relabelled = shipped.shipped_identity(model)
    assert relabelled not in (label, "zero-shot")
    trained.spec.prior_buckets = 20  # same weights, other settings: another label too
    save_indexer(trained, tmp_path / "tiny-llama")
    assert shipped.shipped_identity(model) not in (label, relabelled, "zero-shot")
    assert shipped.shipped_identity(tiny_model("llama", seed=1)) == "zero-shot"


def test_auto_warns_and_falls_back_on_another_backbone(tmp_path, monkeypatch):
    model = tiny_model("llama")
    other = tiny_model("llama", seed=1)
    save_indexer(
        MemoryIndexer.from_model(other, (2, 3), chunk_size=16, fingerprint=model_fingerprint(other)), tmp_path / "x"
    )
    monkeypatch.setattr(shipped, "SHIPPED_DIR", tmp_path)
    with pytest.warns(UserWarning, match="another fingerprint"):
        assert shipped.resolve_indexer(model, "auto") is None


def test_every_shipped_checkpoint_loads():
    from flashmemory.indexer.checkpoint import load_indexer

    for name, spec in shipped.shipped_checkpoints().items():
        # something in it was trained: its query tower, or an attention-feedback head over the zero-shot tower
        assert (spec["trained"] or spec["feedback"]) and spec["fingerprint"], name
        indexer = load_indexer(shipped.SHIPPED_DIR / name, fingerprint=spec["fingerprint"])
        assert indexer.spec.fingerprint == spec["fingerprint"]


def test_auto_does_not_warn_when_a_later_checkpoint_matches(tmp_path, monkeypatch):
    """A same-shape checkpoint of another backbone sorts first; the matching one must still win, silently."""
    import warnings

    model = tiny_model("llama")
    other = tiny_model("llama", seed=1)
    save_indexer(
        MemoryIndexer.from_model(other, (2, 3), chunk_size=16, fingerprint=model_fingerprint(other)), tmp_path / "a"
    )
    mine = MemoryIndexer.from_model(model, (2, 3), chunk_size=16, fingerprint=model_fingerprint(model))
    mine.tower.score_bias.data.fill_(-3.0)
    save_indexer(mine, tmp_path / "b")
    monkeypatch.setattr(shipped, "SHIPPED_DIR", tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        found = shipped.resolve_indexer(model, "auto")
    assert found is not None and float(found.tower.score_bias[0].detach()) == -3.0
    assert shipped.shipped_identity(model).startswith("b@")


def test_a_checkpoint_folder_is_labelled_by_its_weights_and_spec(tmp_path):
    model = tiny_model("llama")
    indexer = MemoryIndexer.from_model(model, (2, 3), chunk_size=16)
    label = checkpoint_identity(save_indexer(indexer, tmp_path / "mine"))
    assert label.startswith("mine@") and label == checkpoint_identity(tmp_path / "mine")
    indexer.spec.prior_buckets = 5
    assert checkpoint_identity(save_indexer(indexer, tmp_path / "mine")) != label
    with pytest.raises(CheckpointError, match="no readable indexer checkpoint"):
        checkpoint_identity(tmp_path / "missing")
    (tmp_path / "mine" / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="no indexer weights"):
        checkpoint_identity(tmp_path / "mine")
