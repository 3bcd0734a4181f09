"""``benchmarks/decode_kernel_sweep.py`` end to end on one small case (CUDA only: it times Triton launches)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.cuda
def test_kernel_sweep_times_every_setting_and_finds_the_default_row_cuda(tmp_path):
    cmd = [sys.executable, str(ROOT / "benchmarks" / "decode_kernel_sweep.py"), "--out", str(tmp_path),
           "--models", "llama3-8b", "--contexts", "8192", "--batches", "1", "--splits", "auto,4",
           "--block-n", "64", "--warps", "4", "--stages", "1,2", "--calls", "2"]  # fmt: skip
    subprocess.run(cmd, check=True, capture_output=True, timeout=600)
    report = json.loads((tmp_path / "kernel_sweep.json").read_text())
    (case,) = report["cases"]
    # 2 split counts x 2 stage counts x both loop forms, each checked against the default before it was timed
    assert len(case["rows"]) == 8 and all(r["err"] < 2e-2 and r["us"] > 0 for r in case["rows"])
    default = case["default"]
    assert default["auto"] and default["branchless"] and default["stages"] == 2 and default["warps"] == 4
    assert case["best"]["us"] <= default["us"]
    assert "| llama3-8b | 8192 | 1 | lsa |" in (tmp_path / "kernel_sweep.md").read_text()
