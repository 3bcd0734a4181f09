"""``benchmarks/runtime_cycle.py`` end to end on a tiny shape on the CPU (the GPU run uses the same code)."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_runtime_cycle_compares_no_copy_recall_and_prefetch(tmp_path):
    cmd = [sys.executable, str(ROOT / "benchmarks" / "runtime_cycle.py"), "--out", str(tmp_path), "--device", "cpu",
           "--model", "tiny", "--layers", "2", "--context", "4096", "--batches", "2", "--cycles", "1",
           "--prefetch", "8", "--dtype", "float32"]  # fmt: skip
    subprocess.run(cmd, check=True, capture_output=True, timeout=300)
    rows = json.loads((tmp_path / "runtime_cycle.json").read_text())["rows"]
    assert [(r["churn"], r["prefetch_steps"]) for r in rows] == [(0.0, 0), (0.25, 0), (0.25, 8)]
    no_copy, at_boundary, prefetch = rows
    assert no_copy["pages_copied_per_cycle"] == 0 and no_copy["spare_slots"] == 0
    assert at_boundary["pages_copied_per_cycle"] > 0 and at_boundary["spare_slots"] == 0
    # the same pages move per cycle, into spare slots of the same reserve
    assert prefetch["spare_slots"] > 0 and prefetch["pages_copied_per_cycle"] == at_boundary["pages_copied_per_cycle"]
    assert prefetch["reserve_bytes"] == at_boundary["reserve_bytes"]
    # a prefetch keys the tail's complete chunks a few steps early; the budget counts every chunk key ahead
    assert 0 <= prefetch["device_kv_bytes"] - at_boundary["device_kv_bytes"] < 0.01 * at_boundary["device_kv_bytes"]
    assert "| 2 | prefetch 8 |" in (tmp_path / "runtime_cycle.md").read_text()
