"""Bad input to the CLI gets one clear line and exit status 2, before any model is loaded."""

import json

import pytest
from typer.testing import CliRunner

from flashmemory.cli import app


@pytest.fixture
def context(tmp_path):
    path = tmp_path / "doc.txt"
    path.write_text("Some long text. " * 50)
    return path


@pytest.mark.parametrize(
    "args, message",
    [
        pytest.param(["--context-file", "nope.txt", "--question", "q?"], "context file not found", id="missing-file"),
        pytest.param(["--question", "   "], "question is empty", id="empty-question"),
        pytest.param(["--question", "q?", "--budget", "-0.5"], "--budget", id="budget-negative"),
        pytest.param(["--question", "q?", "--method", "magic"], "unknown method", id="bad-method"),
        pytest.param(["--question", "q?", "--interval", "20"], "multiple of chunk_size", id="bad-interval"),
        pytest.param(["--question", "q?", "--max-new-tokens", "0"], "max-new-tokens", id="no-tokens"),
        pytest.param(["--question", "q?", "--model", "no-such-model"], "no-such-model", id="unknown-model"),
        pytest.param(["-q", "first?", "-q", " "], "a question is empty", id="one-of-several-empty"),
        pytest.param(["-q", "a?", "-q", "b?", "--method", "magic"], "unknown method", id="several-bad-method"),
        pytest.param(["-q", "a?", "-q", "b?", "--cuda-graph", "--method", "full"], "needs --method lsa", id="graph"),
        pytest.param(["-q", "a?", "--cuda-graph", "--device", "cpu"], "needs a CUDA device", id="graph-on-cpu"),
    ],
)
def test_ask_rejects_bad_input(context, args, message):
    full = ["ask", *args] if "--context-file" in args else ["ask", "--context-file", str(context), *args]
    res = CliRunner().invoke(app, full)
    assert res.exit_code == 2, res.output
    assert message in res.output
    assert "Traceback" not in res.output


def test_ask_rejects_empty_context_file(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    res = CliRunner().invoke(app, ["ask", "--context-file", str(empty), "--question", "q?"])
    assert res.exit_code == 2 and "is empty" in res.output


def test_train_rejects_missing_dump(tmp_path):
    res = CliRunner().invoke(app, ["train", "--dumps", str(tmp_path / "none"), "--out", str(tmp_path / "ck")])
    assert res.exit_code == 2 and "not a dump folder" in res.output


def test_bench_report_rejects_a_folder_without_a_run(tmp_path):
    res = CliRunner().invoke(app, ["bench-report", str(tmp_path / "none")])
    assert res.exit_code == 2 and "is " in res.output and "bench output folder" in res.output


def test_indexer_eval_rejects_corrupt_checkpoint(tmp_path):
    res = CliRunner().invoke(app, ["indexer-eval", "--dumps", str(tmp_path), "--ckpt", str(tmp_path / "x")])
    assert res.exit_code == 2 and "not a dump folder" in res.output


def test_dump_rejects_bad_data_spec(tmp_path):
    res = CliRunner().invoke(app, ["dump", "--data", "n=3,bogus=1", "--out", str(tmp_path / "d"), "--model", "nope"])
    assert res.exit_code == 2


def test_dump_rejects_bad_target_layers_before_loading_a_model(tmp_path):
    res = CliRunner().invoke(app, ["dump", "--target-layers", "12,x", "--out", str(tmp_path / "d"), "--model", "nope"])
    assert res.exit_code == 2 and "comma-separated layer numbers" in res.output


@pytest.mark.parametrize(
    "setting, message",
    [
        pytest.param("follow_chunks", "KEY=VALUE", id="no-value"),
        pytest.param("budget=0.1", "use --budget", id="budget"),
        pytest.param("magic=1", "unknown LSA setting 'magic'", id="unknown"),
        pytest.param("query_window=wide", "not a valid value", id="bad-type"),
        pytest.param("threshold=1.5", "threshold must be in (0, 1)", id="refused-by-config"),
    ],
)
def test_bench_rejects_bad_lsa_settings(tmp_path, setting, message):
    res = CliRunner().invoke(app, ["bench", "ruler", "--lsa", setting, "--out", str(tmp_path / "b")])
    assert res.exit_code == 2, res.output
    assert message in res.output
    assert "Traceback" not in res.output
    assert not (tmp_path / "b").exists()


def test_blend_rejects_a_missing_checkpoint_and_a_weight_out_of_range(tmp_path):
    res = CliRunner().invoke(
        app, ["blend", "--start", str(tmp_path / "a"), "--end", str(tmp_path / "b"), "-w", "0.5", "-o", str(tmp_path)]
    )
    assert res.exit_code == 2 and "not an indexer checkpoint" in res.output
    res = CliRunner().invoke(
        app, ["blend", "--start", str(tmp_path), "--end", str(tmp_path), "-w", "2", "-o", str(tmp_path / "c")]
    )
    assert res.exit_code == 2 and "weight must be in [0, 1]" in res.output


def test_train_feedback_rejects_missing_dump_and_bad_settings(tmp_path):
    base = ["train-feedback", "--dumps", str(tmp_path / "none"), "--indexer", str(tmp_path / "ck"), "--out"]
    res = CliRunner().invoke(app, [*base, str(tmp_path / "out")])
    assert res.exit_code == 2 and "not a dump folder" in res.output
    res = CliRunner().invoke(app, [*base, str(tmp_path / "out"), "--kept", "1.5"])
    assert res.exit_code == 2 and "kept must be in (0, 1)" in res.output
    assert "Traceback" not in res.output


def test_a_host_that_cannot_hold_the_kv_history_gets_one_line_not_a_traceback(capsys):
    from flashmemory.cli.errors import friendly_errors

    @friendly_errors
    def run():
        raise MemoryError("the KV history needs 64.00 GiB of page-locked host memory and this machine could not")

    with pytest.raises(SystemExit) as exit_info:
        run()
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "error:" in err and "64.00 GiB of page-locked host memory" in err and "Traceback" not in err


def test_plan_prints_device_and_host_memory_for_an_architecture():
    out = CliRunner().invoke(
        app,
        [
            "plan",
            "-m",
            "llama3-8b",
            "-c",
            "128K",
            "-c",
            "512K",
            "--budget",
            "0.15",
            "--device-gib",
            "139",
            "--host-gib",
            "120",
        ],
    )
    assert out.exit_code == 0, out.output
    assert "128K" in out.output and "16.0 GiB" in out.output and "64.0 GiB" in out.output
    assert "fit" in out.output and "7 / 7" in out.output  # 120 GiB of host memory hold seven 16 GiB mirrors
    js = CliRunner().invoke(app, ["plan", "-m", "qwen2.5-7b", "-c", "1M", "--json", "--device-gib", "80"])
    assert js.exit_code == 0, js.output
    row = json.loads(js.output.strip().splitlines()[-1])
    assert row["context"] == 1 << 20 and row["full_max_batch"] == 1 and 0.2 < row["kv_ratio"] <= 0.25


@pytest.mark.parametrize(
    "args, message",
    [
        (["-c", "lots"], "token count"),
        (["-c", "1.5"], "whole number"),
        (["--dtype", "int3"], "--dtype must be one of"),
        (["--budget", "0"], "--budget"),
        (["-m", "no-such-model"], "Architectures known without files"),
    ],
)
def test_plan_rejects_bad_input(args, message):
    out = CliRunner().invoke(app, ["plan", "-m", "llama3-8b", *args])
    assert out.exit_code == 2 and message in out.output, out.output


def test_an_answer_record_says_when_a_cuda_graph_replayed_its_steps():
    import io

    from rich.console import Console

    from flashmemory.cli.answer_view import AnswerView

    base = dict(answer="7890", method="lsa", context_tokens=4000, kv_bytes_device=2**20, kv_bytes_full=2**23)
    base |= dict(kv_ratio=0.125, prefill_seconds=0.5, decode_seconds=0.2, new_tokens=16)
    lines = []
    for replayed in (0, 14):
        out = io.StringIO()
        view = AnswerView(Console(file=out, width=300), ["q?"], stream=False, as_json=False, headers=False)
        view.record(0, base | {"replayed_steps": replayed})
        lines.append(out.getvalue())
    assert "replayed" not in lines[0] and "decode 0.20 s" in lines[0]
    assert "14 of 16 steps replayed from a CUDA graph" in lines[1]
