"""Graph replay on a real checkpoint: LSA answers with decode steps replayed from a CUDA graph, against eager LSA
steps and full attention, with the model's packaged indexer, on one CUDA device.

``graph_replay_requests.py`` measures speed on random weights; this checks that on real weights the replayed
steps give the same answers as the eager ones, and how much faster they are, on two workloads per context length:

- ``fact``: held-out planted-fact questions (seeds from 200, as ``planted_fact_eval.py``), a short answer scored
  by the task's own rule;
- ``retell``: the same document with an instruction to retell it, ``--long-tokens`` new tokens at most, so many
  cycles (and the boundaries after the first) are decoded.

Each (workload, length, seed) runs the three modes in a rotating order; every mode is warmed up once per length
first (the capture of a graph is per answer and stays in the timings, as a user pays it).

    python benchmarks/graph_replay_real.py --model smollm2-135m --lengths 2048,4096,7680 --samples 8 \
        --out benchmarks/results/graph_replay_real_smollm2_h200
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from flashmemory import LSAConfig, generate
from flashmemory.bench.planted_fact import planted_fact
from flashmemory.bench.record import provenance, provenance_lines
from flashmemory.runtime.ask import load_on

MODES = {
    "lsa eager": dict(method="lsa", cuda_graph=False),
    "lsa graph": dict(method="lsa", cuda_graph=True),
    "full": dict(method="full", cuda_graph=False),
}
RETELL = "\n\nRetell the text above in detail, paragraph by paragraph."


def timed(model, tok, prompt: str, lsa: LSAConfig, max_new_tokens: int, mode: str):
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    res = generate(model, tok, prompt, lsa=lsa, max_new_tokens=max_new_tokens, **MODES[mode])
    torch.cuda.synchronize()
    return res, time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--lengths", default="2048,4096,7680")
    ap.add_argument("--samples", type=int, default=8)
    ap.add_argument("--seed", type=int, default=200, help="first seed; tests use 0-11, kv_memory 100+")
    ap.add_argument("--budget", type=float, default=0.2)
    ap.add_argument("--fact-tokens", type=int, default=16)
    ap.add_argument("--long-tokens", type=int, default=256)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("this benchmark needs a CUDA device")
    model, tok = load_on(args.model, "cuda", progress=False)
    lsa = LSAConfig(budget=args.budget)
    args.out.mkdir(parents=True, exist_ok=True)
    rows = []
    workloads = {"fact": args.fact_tokens, "retell": args.long_tokens}
    for length in [int(x) for x in args.lengths.split(",")]:
        warm = planted_fact(tok, length, seed=args.seed - 1)
        for mode in MODES:
            timed(model, tok, warm.prompt, lsa, 8, mode)
        for s in range(args.samples):
            task = planted_fact(tok, length, seed=args.seed + s)
            for work, new_tokens in workloads.items():
                prompt = task.prompt if work == "fact" else task.document + RETELL
                order = list(MODES)[s % 3 :] + list(MODES)[: s % 3]
                for mode in order:
                    res, seconds = timed(model, tok, prompt, lsa, new_tokens, mode)
                    row = {
                        "workload": work,
                        "length": length,
                        "seed": args.seed + s,
                        "mode": mode,
                        "seconds": seconds,
                        "decode_seconds": res.stats.decode_seconds,
                        "prefill_seconds": res.stats.prefill_seconds,
                        "new_tokens": res.stats.new_tokens,
                        "kv_ratio": res.stats.kv_ratio,
                        "correct": task.is_correct(res.text) if work == "fact" else None,
                        "text": res.text,
                    }
                    rows.append(row)
                    print(json.dumps({k: row[k] for k in ("workload", "length", "seed", "mode", "seconds")}))
    report = {
        "meta": {
            **provenance("benchmarks/graph_replay_real.py", vars(args)),
            "model": args.model,
            "budget": args.budget,
            "gpu": torch.cuda.get_device_name(),
            "torch": torch.__version__,
        },
        "rows": rows,
    }
    (args.out / "graph_replay_real.json").write_text(json.dumps(report, indent=1))
    table = markdown(report)
    (args.out / "graph_replay_real.md").write_text(table)
    print(table)


def markdown(report: dict) -> str:
    meta, rows = report["meta"], report["rows"]
    lines = [
        f"# LSA answers on {meta['model']}: CUDA-graph replay against eager decode steps",
        "",
        *provenance_lines(meta),
        "",
        f"Budget {meta['budget']}, the packaged indexer, greedy decoding, {meta['gpu']}. Seconds are the median "
        "over the seeds of a whole answer (prefill, capture and decode); eager / graph > 1 means replay is faster. "
        "Same answers: the replayed answer's text equals the eager one's.",
        "",
        "| workload | context | seeds | correct full / eager / graph | same answers | new tokens (median) "
        "| full s | LSA eager s | LSA graph s | eager / graph | full / graph |",
        "|---|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    keys = sorted({(r["workload"], r["length"]) for r in rows})
    for work, length in keys:
        by = {
            m: sorted(
                (r for r in rows if (r["workload"], r["length"], r["mode"]) == (work, length, m)),
                key=lambda r: r["seed"],
            )
            for m in MODES
        }
        med = {m: statistics.median(r["seconds"] for r in by[m]) for m in MODES}
        same = sum(a["text"] == b["text"] for a, b in zip(by["lsa eager"], by["lsa graph"], strict=True))
        n = len(by["lsa graph"])
        correct = (
            " / ".join(str(sum(bool(r["correct"]) for r in by[m])) for m in ("full", "lsa eager", "lsa graph"))
            if work == "fact"
            else "–"
        )
        tokens = statistics.median(r["new_tokens"] for r in by["lsa graph"])
        lines.append(
            f"| {work} | {length} | {n} | {correct} | {same}/{n} | {tokens:g} | {med['full']:.3f} "
            f"| {med['lsa eager']:.3f} | {med['lsa graph']:.3f} | {med['lsa eager'] / med['lsa graph']:.2f} "
            f"| {med['full'] / med['lsa graph']:.2f} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
