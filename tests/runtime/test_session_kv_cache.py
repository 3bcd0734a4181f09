"""A session's context saved to disk and read back: the same answers, without the context's prefill."""

import json

import pytest
import torch

from flashmemory.attention.prefix import PrefixKV
from flashmemory.config import LSAConfig
from flashmemory.memory.kv_files import KVFileError
from flashmemory.models.tiny import tiny_model
from flashmemory.runtime.session import Session

from ..bench.fake_tokenizers import BatchCharTokenizer
from ..conftest import SMALL_LSA

CONTEXT = "".join(chr(97 + (i * 11) % 26) for i in range(600))
QUESTIONS = ("which letter comes twice?", "and the one after it?")
LSA = dict(method="lsa", indexer=None, lsa=LSAConfig(budget=0.3, attention_backend="mask", **SMALL_LSA))


@pytest.mark.parametrize("family", ["llama", "gemma3"])
@pytest.mark.parametrize("kw", [dict(method="full"), LSA], ids=["full", "lsa"])
def test_a_saved_context_answers_as_a_computed_one_and_is_not_prefilled_again(tmp_path, family, kw, monkeypatch):
    model = tiny_model(family)
    tok = BatchCharTokenizer(chat_template="tiny")
    first = Session(model, tok, CONTEXT, kv_cache=tmp_path, **kw)
    assert not first.loaded and first.kv_folder.parent == tmp_path
    manifest = json.loads((first.kv_folder / "manifest.json").read_text())
    assert manifest["length"] == first.prefix.length and manifest["dtype"] == "float32"
    want = [first.ask(q, max_new_tokens=10) for q in QUESTIONS]

    def no_prefill(*args, **kwargs):
        raise AssertionError("the saved context was computed again")

    monkeypatch.setattr(PrefixKV, "capture", no_prefill)
    again = Session(model, tok, CONTEXT, kv_cache=tmp_path, **kw)
    assert again.loaded and again.kv_folder == first.kv_folder
    for k, saved in zip(first.prefix.keys, again.prefix.keys, strict=True):
        assert torch.equal(k, saved)
    for q, w in zip(QUESTIONS, want, strict=True):
        got = again.ask(q, max_new_tokens=10)
        assert got.token_ids == w.token_ids
        assert (
            got.stats.pages_recalled == w.stats.pages_recalled and got.stats.kv_bytes_device == w.stats.kv_bytes_device
        )


def test_another_context_model_or_method_gets_a_folder_of_its_own(tmp_path):
    llama = tiny_model("llama")
    tok = BatchCharTokenizer(chat_template="tiny")
    a = Session(llama, tok, CONTEXT, kv_cache=tmp_path, method="full")
    b = Session(llama, tok, CONTEXT + "z", kv_cache=tmp_path, method="full")
    c = Session(tiny_model("llama", seed=1), tok, CONTEXT, kv_cache=tmp_path, method="full")
    d = Session(llama, tok, CONTEXT, kv_cache=tmp_path, **LSA)  # LSA prefills the context's last tokens again
    e = Session(llama.to(torch.bfloat16), tok, CONTEXT, kv_cache=tmp_path, method="full")
    llama.to(torch.float32)
    tuned = tiny_model("llama")  # a fine-tune of the last layer only: embeddings and layer 0 unchanged
    with torch.no_grad():
        tuned.model.layers[-1].mlp.down_proj.weight.add_(0.01)
    f = Session(tuned, tok, CONTEXT, kv_cache=tmp_path, method="full")
    folders = {s.kv_folder for s in (a, b, c, d, e, f)}
    assert len(folders) == 6 and not any(s.loaded for s in (a, b, c, d, e, f))
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(f.name for f in folders)  # no temporary left


def test_a_damaged_or_mislabelled_folder_is_refused_with_what_to_do(tmp_path):
    model = tiny_model("llama")
    tok = BatchCharTokenizer(chat_template="tiny")
    folder = Session(model, tok, CONTEXT, kv_cache=tmp_path, method="full").kv_folder
    layer = folder / "layer.1.safetensors"
    data = layer.read_bytes()
    layer.write_bytes(data[: len(data) // 2])
    with pytest.raises(KVFileError, match=r"layer.1.safetensors is missing or damaged .* delete"):
        Session(model, tok, CONTEXT, kv_cache=tmp_path, method="full")
    layer.write_bytes(data)
    manifest = json.loads((folder / "manifest.json").read_text())
    (folder / "manifest.json").write_text(json.dumps({**manifest, "fingerprint": "0" * 16}))
    with pytest.raises(KVFileError, match="were saved for fingerprint '0000000000000000'"):
        Session(model, tok, CONTEXT, kv_cache=tmp_path, method="full")
    (folder / "manifest.json").write_text("{not json")
    with pytest.raises(KVFileError, match="manifest.json is damaged"):
        Session(model, tok, CONTEXT, kv_cache=tmp_path, method="full")


def test_the_kv_cache_command_lists_saved_contexts_and_prunes_the_longest_unused(tmp_path):
    import os

    from typer.testing import CliRunner

    from flashmemory.cli import app

    model = tiny_model("llama")
    tok = BatchCharTokenizer(chat_template="tiny")
    old = Session(model, tok, CONTEXT, kv_cache=tmp_path, method="full").kv_folder
    new = Session(model, tok, CONTEXT + "xyz", kv_cache=tmp_path, method="full").kv_folder
    os.utime(old, (1, 1))  # unused for a long time
    (tmp_path / f".{new.name}.tmp-1").mkdir()  # an unfinished save is neither listed nor removed
    (tmp_path / "notes").mkdir()  # nor is anything else the folder holds
    listed = CliRunner().invoke(app, ["kv-cache", str(tmp_path), "--json"])
    assert listed.exit_code == 0, listed.output
    rows = [json.loads(line) for line in listed.stdout.splitlines()]
    assert [r["folder"] for r in rows] == [str(new), str(old)]
    assert rows[0]["length"] == len("<user>" + CONTEXT + "xyz") and rows[0]["bytes"] > 0
    Session(model, tok, CONTEXT, kv_cache=tmp_path, method="full")  # reading it counts as a use
    relisted = CliRunner().invoke(app, ["kv-cache", str(tmp_path), "--json"]).stdout.splitlines()
    assert json.loads(relisted[0])["folder"] == str(old)
    size = rows[0]["bytes"]
    pruned = CliRunner().invoke(app, ["kv-cache", str(tmp_path), "--max-gib", str(1.5 * size / 2**30)])
    assert pruned.exit_code == 0 and f"removed {new.name}" in pruned.output, pruned.output
    assert old.exists() and not new.exists()
    assert (tmp_path / "notes").exists() and (tmp_path / f".{new.name}.tmp-1").exists()
    gone = CliRunner().invoke(app, ["kv-cache", str(tmp_path / "nope")])
    assert gone.exit_code == 2 and "no folder of saved contexts" in gone.output
