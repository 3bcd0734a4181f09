"""``benchmarks/decode_speed.py``: warm-up runs until nothing compiles, and a failed capture stops the run."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from .scripts import load_script

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "decode_speed.py"


@pytest.fixture(scope="module")
def decode_speed():
    yield load_script("decode_speed", register=True)
    sys.modules.pop("decode_speed", None)


def bench_on_cpu(module, warmup_steps: int):
    bench = object.__new__(module.Bench)  # no ceilings to measure: only the warm-up is under test
    bench.device, bench.warmup_steps = torch.device("cpu"), warmup_steps
    return bench


def compiling_step(recompiles: int):
    """A step whose first ``recompiles`` calls each compile a new frame (a new int specialises), then none."""
    torch._dynamo.reset()
    fn = torch.compile(lambda x, k: x * k, backend="eager", dynamic=False)
    calls = []

    def step():
        calls.append(1)
        return fn(torch.ones(2), min(len(calls), recompiles))

    return step, calls


def test_warm_up_runs_until_a_step_compiles_nothing(decode_speed):
    step, calls = compiling_step(recompiles=4)
    bench_on_cpu(decode_speed, warmup_steps=1).warm_up(step)
    # steps 1-4 compile (k = 1..4), step 5 reuses k = 4 and is the first quiet one
    assert len(calls) == 5


def test_warm_up_keeps_its_minimum_when_nothing_compiles(decode_speed):
    step, calls = compiling_step(recompiles=1)
    bench_on_cpu(decode_speed, warmup_steps=3).warm_up(step)
    assert len(calls) == 3


def test_warm_up_gives_up_on_a_step_that_always_compiles(decode_speed):
    step, calls = compiling_step(recompiles=10_000)
    with pytest.raises(RuntimeError, match="still compiling"):
        bench_on_cpu(decode_speed, warmup_steps=1).warm_up(step)
    assert len(calls) == 1 + decode_speed.MAX_EXTRA_WARMUP


def test_a_failed_capture_is_reported_and_reraised_by_measurement(decode_speed):
    bench = bench_on_cpu(decode_speed, warmup_steps=1)
    bench.report = decode_speed.Report(device="cpu", torch=torch.__version__, args={})
    with pytest.raises(decode_speed.CaptureFailed):
        with decode_speed.measurement(bench, "row", any_failure=True):
            raise decode_speed.CaptureFailed("operation failed due to a previous error during capture")
    assert bench.report.errors == ["row: graph capture failed, run stopped: operation failed due to a previous "
                                   "error during capture"]  # fmt: skip
    with decode_speed.measurement(bench, "other row", any_failure=True):
        raise ValueError("an ordinary failure is recorded and the run goes on")
    assert len(bench.report.errors) == 2


@pytest.mark.cuda
def test_autotuned_rows_are_captured_on_a_two_layer_model_cuda(tmp_path):
    cmd = [sys.executable, str(SCRIPT), "--out", str(tmp_path), "--models", "llama3-8b", "--layers", "2",
           "--contexts", "8192", "--steps", "4", "--skip-cycle-costs", "--compile", "--fuse-projections",
           "--autotune"]  # fmt: skip
    subprocess.run(cmd, check=True, capture_output=True, timeout=900)
    report = json.loads((tmp_path / "decode_speed.json").read_text())
    tuned = [r for r in report["rows"] if r["method"].endswith("+fused+autotune")]
    assert report["errors"] == [] and report["short_context"][-1]["method"].endswith("+fused+autotune")
    assert {r["method"] for r in tuned} == {"full_kernel+fused+autotune", "lsa+fused+autotune"}
    assert all(r["graph"] and r["step_ms"] > 0 for r in tuned)
