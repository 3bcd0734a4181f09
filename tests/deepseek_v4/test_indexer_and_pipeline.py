import random

import pytest
import torch
from transformers.cache_utils import DynamicCache

from flashmemory.deepseek_v4 import DeepseekV4LSACache, DeepseekV4MemoryIndexer
from flashmemory.deepseek_v4.capture import selection_mask
from flashmemory.deepseek_v4.spec import native_indexer
from flashmemory.dump.capture import LabelConfig
from flashmemory.dump.runner import run_dump
from flashmemory.dump.shards import iter_records, read_manifest
from flashmemory.indexer.checkpoint import CheckpointError, load_indexer, save_indexer
from flashmemory.train.trainer import TrainConfig, train_indexer

from ..train.blocked_imports import train_without_model_classes
from ..train.fake_tokenizer import CharTokenizer, Prompt
from .helpers import MODEL, decode, small_lsa

TARGETS = (3, 4)


@torch.no_grad()
def test_zero_shot_tower_scores_entries_like_the_native_lightning_indexer():
    indexer = DeepseekV4MemoryIndexer.from_model(MODEL, TARGETS)
    seen = {}
    handles = []
    for layer in TARGETS:
        native = native_indexer(MODEL, layer)
        handles.append(native.register_forward_pre_hook(lambda m, a, layer=layer: seen.__setitem__(("in", layer), a)))
        handles.append(native.scorer.register_forward_hook(lambda m, a, o, layer=layer: seen.__setitem__(layer, o)))
    cache = DynamicCache(config=MODEL.config)
    ids = torch.randint(3, 256, (2, 121))
    MODEL(input_ids=ids, past_key_values=cache, use_cache=True)
    MODEL(input_ids=ids[:, :1], past_key_values=cache, use_cache=True)  # a decode step: one query, no future mask
    for h in handles:
        h.remove()
    for j, layer in enumerate(TARGETS):
        x, q_residual, positions = seen[("in", layer)][:3]
        keys = cache.layers[layer].compressed_kv["indexer"][..., indexer.key_permutation][:, None]
        logits = indexer.layer_logits(j, torch.cat([q_residual, x], -1), positions.expand(2, -1), keys)
        torch.testing.assert_close(logits, seen[layer][:, -1], atol=1e-6, rtol=1e-5)


def test_labels_are_the_top_p_of_the_softmaxed_native_top_k():
    scores = torch.tensor([0.0, 5.0, float("-inf"), 4.0, 1.0, 4.9])
    # top-3 = entries 1, 5, 3; softmax masses ~ 0.38, 0.35, 0.27: p=0.6 needs the first two
    assert selection_mask(scores, topk=3, top_p=0.6).nonzero().flatten().tolist() == [1, 5]
    assert selection_mask(scores, topk=3, top_p=1.0).nonzero().flatten().tolist() == [1, 3, 5]
    assert selection_mask(scores, topk=2, top_p=0.3).nonzero().flatten().tolist() == [1]
    assert not selection_mask(torch.full((4,), float("-inf")), topk=2, top_p=0.6).any()


@pytest.fixture(scope="module")
def dump_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("v4dump")
    rng = random.Random(0)
    text = lambda: "".join(rng.choice("abcdefghij klmnop") for _ in range(230))  # noqa: E731
    prompts = [Prompt(text(), "train") for _ in range(3)] + [Prompt(text(), "validation")]
    run_dump(
        MODEL,
        CharTokenizer(),
        prompts,
        out,
        backbone="tiny-v4",
        fingerprint="fp-v4",
        labels=LabelConfig(chunk_size=16, top_p=0.6, min_layers=2),
        target_layers=TARGETS,
        max_new_tokens=24,
        progress=False,
    )
    return out


def test_dump_records_native_selections_entries_and_tower_inputs(dump_dir):
    manifest = read_manifest(dump_dir)
    assert manifest["complete"] and manifest["labels"]["chunk_size"] == 4  # a V4 chunk is one CSA entry
    for meta, rec in iter_records(dump_dir):
        steps = rec["hidden"].shape[0]
        assert rec["hidden"].shape[1:] == (2, MODEL.config.q_lora_rank + MODEL.config.hidden_size)
        assert rec["chunk_keys"].shape == (2, 1, len(rec["tokens"]) // 4, MODEL.config.index_head_dim)
        assert rec["indptr"].shape[0] == steps + 1 and rec["indices"].numel() > 0
        assert int(rec["indices"].max()) < rec["chunk_keys"].shape[2]
        assert rec["positions"][0] == meta["prompt_tokens"] - 1


def test_dump_train_load_round_trip(dump_dir, tmp_path):
    init = load_indexer(dump_dir / "init_indexer", fingerprint="fp-v4")
    assert isinstance(init, DeepseekV4MemoryIndexer) and init.spec.q_lora_rank == MODEL.config.q_lora_rank
    cfg = TrainConfig(epochs=2, interval=16, recent=16, steps_per_prompt=8, prompts_per_batch=2, window=4, lr=1e-3)
    history = train_indexer([dump_dir], tmp_path / "ck", cfg, progress=False)
    assert len(history["epochs"]) >= 1
    trained = load_indexer(tmp_path / "ck", fingerprint="fp-v4")
    assert isinstance(trained, DeepseekV4MemoryIndexer) and trained.spec.trained
    moved = any(
        not torch.equal(a, b) for a, b in zip(trained.state_dict().values(), init.state_dict().values(), strict=True)
    )
    assert moved
    with pytest.raises(CheckpointError, match="fingerprint"):
        load_indexer(tmp_path / "ck", fingerprint="another")
    # the trained tower drives the runtime
    ids = torch.randint(3, 256, (1, 203))
    with DeepseekV4LSACache(MODEL, small_lsa(max_pages=3, target_layers=TARGETS), trained, max_new_tokens=20) as c:
        decode(MODEL, ids, c, 20)
        assert c.stats.boundaries == 2 and len(c.stats.above_threshold) == 2


def test_v4_checkpoint_round_trip_is_exact(tmp_path):
    indexer = DeepseekV4MemoryIndexer.from_model(MODEL, TARGETS, fingerprint="fp")
    save_indexer(indexer, tmp_path / "ck")
    again = load_indexer(tmp_path / "ck", fingerprint="fp")
    assert type(again) is DeepseekV4MemoryIndexer and again.spec == indexer.spec
    for (name, a), b in zip(indexer.state_dict().items(), again.state_dict().values(), strict=True):
        assert torch.equal(a.float(), b), name


def test_v4_training_never_imports_a_model_class(dump_dir, tmp_path):
    train_without_model_classes(
        dump_dir,
        tmp_path / "ck",
        "epochs=1, interval=16, recent=16, steps_per_prompt=4, prompts_per_batch=2, window=4",
        'assert "flashmemory.deepseek_v4.memory_indexer" in sys.modules',
    )
