"""What one cycle boundary's flush into the pinned host mirror costs, by copy form (CUDA only).

At every boundary the store writes the cycle's new tokens (``interval`` of them, every layer's keys and values)
from the device tail into a token-axis slice of the pinned mirror ``[B, H, T, D]``. That slice is strided, and a
single ``copy_`` into it goes through a pageable bounce buffer. The alternatives: one contiguous ``(sequence, head)``
row at a time (``flashmemory.memory.host_rows.copy_to_host_slice``, as the prefill writes), or one copy into a
contiguous pinned staging buffer and then a host-side copy into the slice (``StagedWriter``, what the stores
do). This times the three forms side by
side, for the 8B Llama shape at 128K, at each batch given: the time the flush holds the calling thread, and the
time until the copies are done.

Usage: ``python benchmarks/mirror_flush_copy.py --out DIR [--batches 1,6,43]``
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from flashmemory.bench.record import provenance
from flashmemory.memory.host_rows import StagedWriter, copy_to_host_slice

LAYERS, HEADS, DIM, CONTEXT, INTERVAL = 32, 8, 128, 131072, 64


def measure(batch: int, reps: int) -> dict:
    dev = torch.device("cuda")
    # one layer's mirror stands for every layer's (host RAM): each of the 2 * LAYERS copies targets its own slice
    mirror = torch.zeros(batch, HEADS, CONTEXT + INTERVAL * (2 * LAYERS + 1), DIM, dtype=torch.bfloat16).pin_memory()
    tails = [torch.randn(batch, HEADS, INTERVAL, DIM, dtype=torch.bfloat16, device=dev) for _ in range(2 * LAYERS)]
    nbytes = sum(t.numel() * t.element_size() for t in tails)
    result = {"batch": batch, "gb": nbytes / 1e9}
    writer = StagedWriter()  # what the stores use
    forms = {
        "one_copy": lambda pairs: [out.copy_(src, non_blocking=True) for src, out in pairs],
        "rows": lambda pairs: [copy_to_host_slice(src, out) for src, out in pairs],
        "staged": writer.write,
    }
    for name, flush in forms.items():
        host, done = [], []
        for r in range(reps + 1):
            torch.cuda.synchronize()
            lo = CONTEXT + (r % 2) * INTERVAL
            t0 = time.perf_counter()
            outs = [mirror[:, :, lo + i * INTERVAL : lo + (i + 1) * INTERVAL] for i in range(len(tails))]
            flush(list(zip(tails, outs, strict=True)))
            t1 = time.perf_counter()
            torch.cuda.synchronize()
            t2 = time.perf_counter()
            if r:  # the first is a warm-up
                host.append(1e3 * (t1 - t0))
                done.append(1e3 * (t2 - t0))
        for i, src in enumerate(tails):  # what the last repeat wrote is what the tails hold
            lo = CONTEXT + (reps % 2) * INTERVAL + i * INTERVAL
            assert torch.equal(mirror[:, :, lo : lo + INTERVAL], src.cpu()), f"{name} wrote wrong values"
            mirror[:, :, lo : lo + INTERVAL].zero_()  # the next form must write them again
        host.sort(), done.sort()
        result[f"{name}_host_ms"] = host[len(host) // 2]
        result[f"{name}_done_ms"] = done[len(done) // 2]
        result[f"{name}_gb_s"] = nbytes / 1e6 / result[f"{name}_done_ms"]
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--batches", default="1,6,43")
    p.add_argument("--reps", type=int, default=5)
    args = p.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("mirror_flush_copy.py measures host-device copies: it needs a CUDA device")
    prov = provenance("benchmarks/mirror_flush_copy.py", vars(args))
    rows = []
    for b in (int(x) for x in args.batches.split(",")):
        r = measure(b, args.reps)
        rows.append(r)
        print(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in r.items()}), flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    report = {**prov, "device": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": rows}
    (args.out / "mirror_flush_copy.json").write_text(json.dumps(report, indent=1))
    lines = [
        f"`{prov['command']}` at `{prov['commit']}`, {report['device']}",
        "",
        "| batch | GB per boundary | one copy: ms | GB/s | rows: ms | GB/s | staged: ms | GB/s |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['batch']} | {r['gb']:.3f} | {r['one_copy_done_ms']:.1f} | {r['one_copy_gb_s']:.1f} | "
            f"{r['rows_done_ms']:.1f} | {r['rows_gb_s']:.1f} | {r['staged_done_ms']:.1f} | {r['staged_gb_s']:.1f} |"
        )
    (args.out / "mirror_flush_copy.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
