"""The benchmark runner on a tiny random llama with a character tokenizer and stand-in RULER samples."""

import dataclasses
import json
import multiprocessing
import os
import re

import pytest
import torch

from flashmemory.bench import methods as methods_mod
from flashmemory.bench import runner
from flashmemory.bench.ruler import RulerSample
from flashmemory.bench.workers import WorkerError
from flashmemory.config import LSAConfig, with_overrides
from flashmemory.models.adapter import DEFAULT_TOKEN_KEYS_FROM, BackboneSpec
from flashmemory.models.tiny import tiny_model

from .fake_tokenizers import CharTokenizer

SMALL = LSAConfig(chunk_size=8, page_chunks=2, interval=16, recent=16, sink=4)
ALL = ["full", "lsa", "lsa-zeroshot", "recent", "random"]


def fake_ruler(task, tokenizer, *, length, num_samples, seed, start=0):
    out = []
    for i in range(start, num_samples):
        text = f"{task} sample {i} seed {seed}. " + "The grass is green. " * 14 + "The key is 42. Answer:"
        out.append(RulerSample(task, i, text, ["42"], length, " Answer:", len(text), max_new_tokens=20))
    return out


def tiny_loader(name, device):
    """Module level, so that spawned benchmark workers can unpickle it."""
    return tiny_model("llama", vocab_size=256), CharTokenizer()


def failing_loader(name, device):
    """Loads in the parent; in a worker, dies silently (``os._exit``) or refuses the model, as ``name`` says."""
    if multiprocessing.current_process().name == "MainProcess":
        return tiny_loader(name, device)
    if name == "dies":
        os._exit(3)
    raise ValueError(f"no model called {name}")


@pytest.fixture
def bench(monkeypatch, tmp_path):
    monkeypatch.setattr(runner, "generate_ruler", fake_ruler)
    model = tiny_model("llama", vocab_size=256)

    def call(out=None, taskset="ruler:niah_single_1,vt", **kw):
        args = dict(
            lengths=[512],
            methods=ALL,
            samples=2,
            out=out or tmp_path / "run",
            budget=0.6,
            seed=0,
            device="cpu",
            progress=False,
            load=lambda name, device: (model, CharTokenizer()),
            lsa=SMALL,
        )
        args.update(kw)
        return runner.run_bench(taskset, "tiny", **args)

    return call


def _rows(path):
    return [json.loads(line) for line in (path / "results.jsonl").read_text().splitlines()]


def test_every_method_runs_with_same_device_bytes(bench, tmp_path):
    summary = bench()
    rows = _rows(tmp_path / "run")
    assert len(rows) == 2 * 2 * len(ALL)  # tasks x samples x methods
    assert {r["method"] for r in rows} == set(ALL)
    by = {(r["task"], r["sample"], r["method"]): r for r in rows}
    for task in ("niah_single_1", "vt"):
        for i in range(2):
            lsa = by[task, i, "lsa"]
            assert 0 < lsa["kv_ratio"] < 1
            assert by[task, i, "full"]["kv_ratio"] == 1.0
            for baseline in ("lsa-zeroshot", "recent", "random"):
                assert by[task, i, baseline]["kv_bytes_device"] == lsa["kv_bytes_device"]
            assert lsa["boundaries"] >= 1 and lsa["page_slots"] >= 1
    assert {c["method"] for c in summary["overall"]} == set(ALL)
    for name in ("summary.json", "summary.md", "accuracy_vs_kv.png", "accuracy_per_task.png", "config.json"):
        assert (tmp_path / "run" / name).stat().st_size > 0
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["tasks"] == ["niah_single_1", "vt"] and config["commit"] and config["machine"]
    assert "| niah_single_1 |" in (tmp_path / "run" / "summary.md").read_text()


def test_rerun_skips_finished_rows(bench, tmp_path, monkeypatch):
    bench(methods=["full", "recent"])
    before = _rows(tmp_path / "run")

    def boom(*a, **k):
        raise AssertionError("recomputed a finished row")

    for cls in (methods_mod.FullAttention, methods_mod.LSAMethod):
        monkeypatch.setattr(cls, "run", boom)
    summary = bench(methods=["full", "recent"])
    assert _rows(tmp_path / "run") == before
    assert len(summary["overall"]) == 2


def test_each_row_names_the_commit_of_the_run_that_made_it(bench, tmp_path, monkeypatch):
    monkeypatch.setenv("FLASHMEMORY_COMMIT", "aaaaaaa")
    bench(methods=["full"], samples=1)
    monkeypatch.setenv("FLASHMEMORY_COMMIT", "bbbbbbb")
    bench(methods=["full"], samples=2)  # resumes: only sample 1 is new
    rows = _rows_ok(tmp_path / "run" / "results.jsonl")
    assert {(r["sample"], r["commit"]) for r in rows} == {(0, "aaaaaaa"), (1, "bbbbbbb")}
    assert json.loads((tmp_path / "run" / "config.json").read_text())["commit"] == "bbbbbbb"


def test_torn_last_line_is_recomputed(bench, tmp_path):
    bench(methods=["full"], samples=1)
    path = tmp_path / "run" / "results.jsonl"
    path.write_text(path.read_text().splitlines()[0] + "\n" + '{"task": "vt", "len')
    bench(methods=["full"], samples=1)
    assert {(r["task"], r["method"]) for r in _rows_ok(path)} == {("niah_single_1", "full"), ("vt", "full")}


def _rows_ok(path):
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            pass
    return out


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(methods=["full", "h2o"]), "unknown method 'h2o'; valid methods: full, lsa"),
        (dict(taskset="ruler:niah_single_1,nope"), "unknown ruler task(s) nope; valid tasks: niah_single_1"),
        (dict(taskset="longbench"), "unknown taskset 'longbench'; valid tasksets: ruler"),
        (dict(samples=0), "--samples must be >= 1"),
        (dict(budget=0.0), "--budget must be a fraction"),
        (dict(budget=-1.0), "--budget must be a fraction"),
        (dict(lengths=[]), "--lengths needs at least one length"),
        (dict(lengths=[100_000]), "exceeds the model's context window (8192 tokens)"),
        (dict(protocol="question-last"), "--protocol question-last needs prompts that end with a question turn"),
        (dict(protocol="two-turn"), "unknown --protocol 'two-turn'; valid: single-prefill, question-last"),
    ],
)
def test_bad_options(bench, kwargs, message):
    with pytest.raises(ValueError) as err:
        bench(**kwargs)
    assert message in str(err.value)


def test_changed_settings_refuse_the_folder(bench):
    bench(methods=["full"], samples=1)
    with pytest.raises(ValueError, match="holds results of another run"):
        bench(methods=["full"], samples=1, budget=0.7)
    with pytest.raises(ValueError, match="holds results of another run"):
        bench(methods=["full"], samples=1, lsa=with_overrides(SMALL, ["follow_chunks=1"]))
    bench(methods=["full"], samples=1, lsa=with_overrides(SMALL, []))  # the same settings resume


def test_folders_written_before_an_lsa_setting_existed_resume_with_what_they_ran(bench, tmp_path):
    out = tmp_path / "old"
    ran = with_overrides(SMALL, ["first_boundary_keys=chunk"])  # what every run did before the setting existed
    bench(out=out, methods=["full"], samples=1, lsa=ran)
    config = json.loads((out / "config.json").read_text())
    del config["lsa"]["first_boundary_keys"], config["lsa"]["token_keys_from"]  # as written back then
    del config["lsa_default_scorer"]["token_keys_from"]
    (out / "config.json").write_text(json.dumps(config))
    bench(out=out, methods=["full"], samples=1, lsa=ran)
    for changed in (["first_boundary_keys=token"], []):  # the default is now "auto"
        with pytest.raises(ValueError, match="holds results of another run"):
            bench(out=out, methods=["full"], samples=1, lsa=with_overrides(SMALL, changed))


def test_rows_of_another_shipped_indexer_are_not_mixed(bench, monkeypatch):
    summary = bench(methods=["lsa"], samples=1)
    assert summary["config"]["lsa_indexer"] == "zero-shot"
    monkeypatch.setattr(runner, "shipped_identity", lambda model: "tiny@0123456789ab")
    with pytest.raises(ValueError, match="lsa_indexer: 'zero-shot' -> 'tiny@0123456789ab'"):
        bench(methods=["lsa"], samples=1)


def test_a_folder_resumes_for_the_other_methods_without_lsa(bench, monkeypatch, tmp_path):
    bench(methods=["full", "lsa"], samples=1)
    monkeypatch.setattr(runner, "shipped_identity", lambda model: "tiny@0123456789ab")
    # lsa is not run, so the indexer it would load does not matter: the folder keeps its record
    summary = bench(methods=["full", "recent"], samples=1)
    assert summary["config"]["lsa_indexer"] == "zero-shot"
    assert {r["method"] for r in _rows_ok(tmp_path / "run" / "results.jsonl")} == {"full", "lsa", "recent"}
    with pytest.raises(ValueError, match="lsa_indexer: 'zero-shot' -> 'tiny@0123456789ab'"):
        bench(methods=["lsa"], samples=1)  # running lsa again still checks it


def test_rows_made_with_other_default_layers_are_not_mixed(bench, monkeypatch, tmp_path):
    summary = bench(methods=["full"], samples=1)
    scorer = summary["config"]["lsa_default_scorer"]
    assert summary["config"]["lsa"]["target_layers"] is None  # the default, resolved for the record
    assert scorer["target_layers"] and scorer["layer_reduce"] == "mean"
    monkeypatch.setattr(BackboneSpec, "default_target_layers", lambda self: (0,))
    with pytest.raises(ValueError, match=re.escape("lsa_default_scorer: ")):
        bench(methods=["full"], samples=1)
    # explicit layers are scored with the max, as before
    summary = bench(
        out=tmp_path / "explicit", methods=["full"], samples=1, lsa=with_overrides(SMALL, ["target_layers=1"])
    )
    assert summary["config"]["lsa_default_scorer"] == {
        "target_layers": [1],
        "layer_reduce": "max",
        "token_keys_from": DEFAULT_TOKEN_KEYS_FROM,
        "page_chunks": 2,
        "follow_chunks": 0,
    }


def test_rows_made_with_another_token_keys_threshold_are_not_mixed(bench, monkeypatch, tmp_path):
    bench(methods=["full"], samples=1)
    monkeypatch.setattr(BackboneSpec, "default_token_keys_from", lambda self: 4096)
    with pytest.raises(ValueError, match=re.escape("lsa_default_scorer: ")):
        bench(methods=["full"], samples=1)
    # a threshold that is set, or a mode that has none, does not depend on the backbone's
    set_ = with_overrides(SMALL, ["token_keys_from=100"])
    assert (
        bench(out=tmp_path / "set", methods=["full"], samples=1, lsa=set_)["config"]["lsa_default_scorer"][
            "token_keys_from"
        ]
        == 100
    )
    chunk = with_overrides(SMALL, ["first_boundary_keys=chunk"])
    assert (
        bench(out=tmp_path / "chunk", methods=["full"], samples=1, lsa=chunk)["config"]["lsa_default_scorer"][
            "token_keys_from"
        ]
        is None
    )


def test_rows_made_with_another_page_size_are_not_mixed(bench, monkeypatch, tmp_path):
    unset = dataclasses.replace(SMALL, page_chunks=None)  # the backbone's size
    summary = bench(methods=["full"], samples=1, lsa=unset)
    assert summary["config"]["lsa"]["page_chunks"] is None
    assert summary["config"]["lsa_default_scorer"]["page_chunks"] == 4  # the tiny model's shape is not measured
    monkeypatch.setattr(BackboneSpec, "default_page_chunks", lambda self: 2)
    with pytest.raises(ValueError, match=re.escape("lsa_default_scorer: ")):
        bench(methods=["full"], samples=1, lsa=unset)
    # a size that is set does not depend on the backbone's
    assert bench(out=tmp_path / "set", methods=["full"], samples=1)["config"]["lsa_default_scorer"]["page_chunks"] == 2


def test_folders_written_while_pages_had_4_chunks_resume_with_that_size(bench, monkeypatch, tmp_path):
    out = tmp_path / "old"
    unset = dataclasses.replace(SMALL, page_chunks=None)
    bench(out=out, methods=["full"], samples=1, lsa=unset)
    config = json.loads((out / "config.json").read_text())
    config["lsa"]["page_chunks"] = 4  # as written back then, when 4 was the default
    del config["lsa_default_scorer"]["page_chunks"]
    (out / "config.json").write_text(json.dumps(config))
    bench(out=out, methods=["full"], samples=1, lsa=dataclasses.replace(SMALL, page_chunks=4))
    (out / "config.json").write_text(json.dumps(config))
    bench(out=out, methods=["full"], samples=1, lsa=unset)  # the tiny model's size is 4
    (out / "config.json").write_text(json.dumps(config))
    monkeypatch.setattr(BackboneSpec, "default_page_chunks", lambda self: 2)
    with pytest.raises(ValueError, match="holds results of another run"):
        bench(out=out, methods=["full"], samples=1, lsa=unset)


def test_folders_written_while_no_chunk_followed_resume_where_the_backbone_takes_none(bench, monkeypatch, tmp_path):
    out = tmp_path / "old"
    bench(out=out, methods=["full"], samples=1, lsa=SMALL)  # follow_chunks unset: the backbone's count
    config = json.loads((out / "config.json").read_text())
    config["lsa"]["follow_chunks"] = 0  # as written back then, when 0 was the default
    del config["lsa_default_scorer"]["follow_chunks"]
    (out / "config.json").write_text(json.dumps(config))
    bench(out=out, methods=["full"], samples=1, lsa=SMALL)  # the tiny model's shape takes none
    (out / "config.json").write_text(json.dumps(config))
    monkeypatch.setattr(BackboneSpec, "default_follow_chunks", lambda self: 1)
    with pytest.raises(ValueError, match="holds results of another run"):
        bench(out=out, methods=["full"], samples=1, lsa=SMALL)


def test_folders_whose_tail_kept_room_for_a_whole_cycle_are_not_resumed(bench, tmp_path):
    out = tmp_path / "old"
    summary = bench(out=out, methods=["full"], samples=1)
    assert summary["config"]["lsa_tail_room"] == runner.TAIL_ROOM
    config = json.loads((out / "config.json").read_text())
    del config["lsa_tail_room"]  # as written before the tail was sized by the request
    (out / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=re.escape("lsa_tail_room: 'interval' -> ")):
        bench(out=out, methods=["full"], samples=1)


def test_baseline_page_choosers():
    class Store:
        batch = 2

        def __init__(self, slots, selectable):
            self.layout = type("L", (), {"num_page_slots": slots})()
            self._sel = selectable

        def selectable_pages(self):
            return self._sel

    cache = type("C", (), {"selectable_pages": lambda self: self.store.selectable_pages()})()
    cache.store = Store(3, 10)
    recent = methods_mod.RecentPages().page_chooser()(cache)
    assert recent.tolist() == [[7, 8, 9], [7, 8, 9]]
    choose = methods_mod.RandomPages(seed=1).page_chooser()
    a, b = choose(cache), choose(cache)
    assert a.shape == (2, 3) and ((a >= 0) & (a < 10)).all() and not torch.equal(a, b)
    assert all(len(set(row)) == 3 for row in a.tolist())
    assert torch.equal(a, methods_mod.RandomPages(seed=1).page_chooser()(cache))
    cache.store = Store(4, 2)
    assert methods_mod.RecentPages().page_chooser()(cache).tolist() == [[0, 1, -1, -1]] * 2
    assert sorted(methods_mod.RandomPages().page_chooser()(cache)[0].tolist()) == [-1, -1, 0, 1]


def test_time_boxed_run_covers_every_task_then_resumes(bench, tmp_path, monkeypatch):
    clock = iter(range(0, 10_000, 60))  # each look at the clock is a minute later
    monkeypatch.setattr(runner, "_clock", lambda: next(clock))
    summary = bench(methods=["full", "recent"], max_minutes=2.5)
    rows = _rows(tmp_path / "run")
    # two (task, sample) units fit before the limit; index-major order gives sample 0 of both tasks
    assert sorted((r["task"], r["sample"]) for r in rows) == [("niah_single_1", 0)] * 2 + [("vt", 0)] * 2
    assert not summary["complete"] and summary["rows"] == {"finished": 4, "planned": 8, "compared": 4}
    assert "Partial run:" in (tmp_path / "run" / "summary.md").read_text()
    summary = bench(methods=["full", "recent"])
    assert summary["complete"] and len(_rows(tmp_path / "run")) == 8
    assert "Partial run:" not in (tmp_path / "run" / "summary.md").read_text()


def test_max_minutes_must_be_positive(bench):
    with pytest.raises(ValueError, match="max-minutes"):
        bench(max_minutes=0)


def _comparable(rows):
    timing = {"prefill_seconds", "decode_seconds"}
    return sorted(({k: v for k, v in r.items() if k not in timing} for r in rows), key=runner._row_key)


def test_workers_give_the_rows_of_one_process(bench, tmp_path):
    bench(methods=["full", "lsa", "random"], load=tiny_loader)
    summary = bench(out=tmp_path / "two", methods=["full", "lsa", "random"], load=tiny_loader, workers=2)
    assert summary["complete"] and summary["config"]["workers"] == 2
    assert _comparable(_rows(tmp_path / "two")) == _comparable(_rows(tmp_path / "run"))


@pytest.mark.parametrize(("name", "error", "message"), [
    ("dies", WorkerError, "died with exit code 3"),
    ("nothing", ValueError, "no model called nothing"),
])  # fmt: skip
def test_worker_failures_reach_the_parent(bench, tmp_path, name, error, message):
    with pytest.raises(error, match=message):
        runner.run_bench("ruler:vt", name, lengths=[512], methods=["full"], samples=1, out=tmp_path / name,
                         budget=0.6, seed=0, device="cpu", progress=False, load=failing_loader, lsa=SMALL,
                         workers=2)  # fmt: skip


def test_workers_must_be_positive(bench):
    with pytest.raises(ValueError, match="--workers"):
        bench(workers=0)


def test_report_rebuilds_a_stopped_run_on_the_samples_every_method_finished(bench, tmp_path, monkeypatch):
    bench(methods=["full", "recent"])
    run = tmp_path / "run"
    lines = (run / "results.jsonl").read_text().splitlines()
    # a run killed mid-sample: one method's row of the last sample is missing, the summaries are stale
    (run / "results.jsonl").write_text("\n".join(lines[:-1]) + "\n")
    for name in ("summary.json", "summary.md"):
        (run / name).unlink()
    monkeypatch.setattr(runner, "default_loader", lambda *a: pytest.fail("the report loaded a model"))
    summary = runner.report_folder(run)
    assert summary["rows"] == {"finished": 7, "planned": 8, "compared": 6}
    assert not summary["complete"] and "rows whose sample every method finished" in (run / "summary.md").read_text()
    # every (method, task) cell now rests on the same samples
    assert {c["samples"] for c in summary["per_task"]} <= {1, 2}
    cells = {(c["method"], c["task"]): c["samples"] for c in summary["per_task"]}
    assert all(cells[("full", t)] == cells[("recent", t)] for t in ("niah_single_1", "vt"))
    assert (run / "summary.json").exists() and (run / "accuracy_per_task.png").exists()


def test_report_refuses_a_folder_without_a_run(tmp_path):
    with pytest.raises(FileNotFoundError, match="bench output folder"):
        runner.report_folder(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    (tmp_path / "results.jsonl").write_text("")
    with pytest.raises(ValueError, match="not a bench config"):
        runner.report_folder(tmp_path)


def test_lsa_methods_decode_on_the_fast_path_when_the_settings_ask_for_it(bench, tmp_path):
    prefetch = with_overrides(SMALL, ["prefetch_steps=4", "attention_backend=torch"])
    summary = bench(methods=["lsa", "recent"], lsa=prefetch, samples=1)
    rows = _rows(tmp_path / "run")
    assert summary["complete"] and len(rows) == 4 and all(r["boundaries"] >= 1 for r in rows)
    # prefetch needs the fast path; on the CPU "auto" resolves to the masked path, which refuses it clearly
    with pytest.raises(ValueError, match="needs the fast path"):
        bench(methods=["lsa"], lsa=with_overrides(SMALL, ["prefetch_steps=4"]), samples=1, out=tmp_path / "auto")
