"""Whole LSA answers with decode steps replayed from a CUDA graph against eager steps, and full attention.

The graph is captured once per answer (each answer has a cache of its own), so a short answer pays the capture
and a long one gains from every replay. This measures where graph replay pays, per context length and answer
length, to choose what ``flashmemory ask`` and ``serve`` do by default on a CUDA device.

A random-weight model with a real shape (time does not depend on weight values) reads one context per length,
prefilled once per mode through a :class:`flashmemory.Session`; each answer then prefills its question against
it and decodes exactly ``--new-tokens`` steps (random weights rarely end the text; the rows say how many ran).
Per context, new-token count and mode: the seconds of the whole answer (median of ``--repeats``, the modes
taking turns first), its decode seconds, and whether the eager and replayed answers are the same tokens. Byte
tokenizer (``session_speed.py``'s), so the context is exactly that many tokens.

    python benchmarks/graph_replay_requests.py --shape llama3-8b --contexts 8192,32768,131072 \
        --new-tokens 16,64,256 --out benchmarks/results/graph_replay_requests_h200
"""

from __future__ import annotations

import argparse
import gc
import json
import random
import statistics
import time
from pathlib import Path

import torch
from decode_speed import SHAPES
from session_speed import WORDS, ByteTokenizer, random_weight_model, text_of

from flashmemory import LSAConfig, Session
from flashmemory.bench.record import provenance, provenance_lines

MODES = {
    "lsa eager": dict(method="lsa", cuda_graph=False),
    "lsa graph": dict(method="lsa", cuda_graph=True),
    "full": dict(method="full", cuda_graph=False),
}


def answer(session: Session, question: str, new_tokens: int):
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    result = session.ask(question, max_new_tokens=new_tokens)
    torch.cuda.synchronize()
    return result, time.perf_counter() - t0


def markdown(report: dict) -> str:
    lines = [
        "# LSA answers: CUDA-graph replay against eager decode steps (random weights, real shape)",
        "",
        *provenance_lines(report),
        "",
        "Seconds of a whole answer (its question's prefill against the session's context, then the decode), median",
        "of the repeats; eager / graph > 1 means replay is faster.",
        "",
        "| context | new tokens | LSA eager s | LSA graph s | eager / graph | full s | full / graph "
        "| decode ms/token eager / graph / full | same tokens eager, graph |",
        "|---:|---:|---:|---:|---:|---:|---:|---|---:|",
    ]
    for r in report["rows"]:
        m = r["modes"]
        per = " / ".join(f"{1000 * m[k]['decode_seconds'] / max(1, m[k]['steps']):.2f}" for k in MODES)
        lines.append(
            f"| {r['context']} | {r['new_tokens']} | {m['lsa eager']['seconds']:.3f} | "
            f"{m['lsa graph']['seconds']:.3f} | {m['lsa eager']['seconds'] / m['lsa graph']['seconds']:.2f}x | "
            f"{m['full']['seconds']:.3f} | {m['full']['seconds'] / m['lsa graph']['seconds']:.2f}x | {per} | "
            f"{'yes' if r['same_tokens'] else 'no'} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="llama3-8b", choices=sorted(SHAPES))
    ap.add_argument("--layers", type=int, default=None)
    ap.add_argument("--contexts", default="8192,32768,131072")
    ap.add_argument("--new-tokens", default="16,64,256")
    ap.add_argument("--budget", type=float, default=0.15)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("this benchmark times a GPU; run it on a machine with CUDA")
    report = {**provenance("benchmarks/graph_replay_requests.py", vars(args) | {"out": str(args.out)}), "rows": []}
    torch.manual_seed(args.seed)
    model = random_weight_model(args.shape, args.layers)
    tok, rng = ByteTokenizer(), random.Random(args.seed)
    lsa = LSAConfig(budget=args.budget)
    args.out.mkdir(parents=True, exist_ok=True)
    counts = [int(n) for n in args.new_tokens.split(",")]
    # kernels compile and libraries initialise on first use: let that happen before anything is timed
    for mode in MODES.values():
        Session(model, tok, text_of(4096, rng), lsa=lsa, indexer="zero-shot", chat=False, **mode).ask("w?")
    for context in (int(c) for c in args.contexts.split(",")):
        text = text_of(context, rng)
        sessions = {
            name: Session(model, tok, text, lsa=lsa, indexer="zero-shot", chat=False, **mode)
            for name, mode in MODES.items()
        }
        for n in counts:
            timings = {name: [] for name in MODES}
            tokens = {}
            for r in range(args.repeats):
                question = f"Which word follows the {r + 1}-th '{rng.choice(WORDS)}'?"
                order = list(MODES)[:: 1 if r % 2 == 0 else -1]
                for name in order:
                    result, seconds = answer(sessions[name], question, n)
                    timings[name].append((seconds, result.stats.decode_seconds, result.stats.new_tokens))
                    tokens.setdefault(r, {})[name] = result.token_ids
            row = {"context": context, "new_tokens": n, "modes": {}}
            for name, runs in timings.items():
                row["modes"][name] = {
                    "seconds": statistics.median(s for s, _, _ in runs),
                    "decode_seconds": statistics.median(d for _, d, _ in runs),
                    "steps": statistics.median(k for _, _, k in runs),
                    "runs": runs,
                }
            row["same_tokens"] = all(t["lsa eager"] == t["lsa graph"] for t in tokens.values())
            report["rows"].append(row)
            print(json.dumps(row), flush=True)
            (args.out / "graph_replay_requests.json").write_text(json.dumps(report, indent=1))
            (args.out / "README.md").write_text(markdown(report))
        del sessions
        gc.collect()
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
