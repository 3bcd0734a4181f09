"""Several questions about one document: one prefill (a Session) against one request per question.

Each document holds ``--facts`` planted facts and one question about each. Per method (full attention, LSA with
the shipped indexer), the questions are answered twice in one run, side by side: as separate requests
(``flashmemory.generate``: the whole prompt prefilled for every question) and through one
:class:`flashmemory.Session` (the context prefilled once, each question prefilled against it). Recorded: the share
of answers that are token for token the same both ways, each way's correct answers, the device KV share, and the
wall-time ratio of separate requests to the session (the two run in turn first, document by document).

    python benchmarks/session_questions.py --model smollm2-135m --length 4096 --docs 4 --facts 4 --budget 0.2 \
        --out benchmarks/results/session_questions_smollm2_cpu
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from flashmemory import LSAConfig, Session, generate
from flashmemory.bench.planted_fact import planted_facts
from flashmemory.bench.record import provenance
from flashmemory.runtime.ask import load_on
from flashmemory.runtime.session import build_prompt


def run_doc(
    model, tok, items, method: str, lsa: LSAConfig | None, max_new_tokens: int, session_first: bool
) -> list[dict]:
    """Answer every question of one document both ways (in the order given); one row per question."""
    document = items[0].document

    def separately():
        return [
            generate(
                model,
                tok,
                build_prompt(document, it.question),
                method=method,
                lsa=lsa,
                max_new_tokens=max_new_tokens,
                cuda_graph=False,
            )
            for it in items
        ]

    def in_session():
        session = Session(model, tok, document, method=method, lsa=lsa, cuda_graph=False)
        return [session.ask(it.question, max_new_tokens=max_new_tokens) for it in items]

    timed = {}
    for name, fn in (("session", in_session), ("separate", separately))[:: 1 if session_first else -1]:
        t0 = time.perf_counter()
        timed[name] = (fn(), time.perf_counter() - t0)
    (separate, separate_s), (shared, session_s) = timed["separate"], timed["session"]
    rows = []
    for it, one, many in zip(items, separate, shared, strict=True):
        rows.append(
            {
                "method": method,
                "question": it.question,
                "answer": it.answer,
                "separate_text": one.text,
                "session_text": many.text,
                "same_tokens": one.token_ids == many.token_ids,
                "separate_correct": it.is_correct(one.text),
                "session_correct": it.is_correct(many.text),
                "kv_ratio": many.stats.kv_ratio,
                "context_tokens": many.stats.context_tokens,
            }
        )
    rows[0]["separate_seconds"], rows[0]["session_seconds"] = separate_s, session_s
    return rows


def summary(rows: list[dict]) -> dict[str, dict]:
    out = {}
    for method in dict.fromkeys(r["method"] for r in rows):
        mine = [r for r in rows if r["method"] == method]
        n = len(mine)
        separate_s = sum(r.get("separate_seconds", 0.0) for r in mine)
        session_s = sum(r.get("session_seconds", 0.0) for r in mine)
        out[method] = {
            "questions": n,
            "same_tokens": sum(r["same_tokens"] for r in mine) / n,
            "separate_correct": sum(r["separate_correct"] for r in mine),
            "session_correct": sum(r["session_correct"] for r in mine),
            "kv_ratio": sum(r["kv_ratio"] for r in mine) / n,
            "separate_seconds": separate_s,
            "session_seconds": session_s,
            "speedup": separate_s / session_s,
        }
    return out


def markdown(meta: dict, summ: dict) -> str:
    lines = [
        "# Several questions over one prefill (Session) vs one request per question",
        "",
        f"- command: `{meta['command']}`",
        f"- commit: `{meta['commit']}`",
        f"- machine: {meta['machine']}",
        "",
        "| method | questions | same tokens | correct (separate) | correct (session) | device KV | "
        "time separate / session |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for method, s in summ.items():
        lines.append(
            f"| {method} | {s['questions']} | {s['same_tokens']:.0%} | {s['separate_correct']} | "
            f"{s['session_correct']} | {s['kv_ratio']:.1%} | {s['speedup']:.2f}x |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--length", type=int, default=4096)
    ap.add_argument("--docs", type=int, default=4)
    ap.add_argument("--facts", type=int, default=4)
    ap.add_argument("--budget", type=float, default=0.2)
    ap.add_argument("--seed", type=int, default=400, help="first seed; planted_fact_eval uses 200+, tests 0-11")
    ap.add_argument("--max-new-tokens", type=int, default=24)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    model, tok = load_on(args.model, "auto", progress=False)
    lsa = LSAConfig(budget=args.budget)
    rows = []
    for d in range(args.docs):
        items = planted_facts(tok, args.length, args.facts, seed=args.seed + d)
        for method in ("full", "lsa"):
            cfg = lsa if method == "lsa" else None
            rows += run_doc(model, tok, items, method, cfg, args.max_new_tokens, session_first=d % 2 == 1)
            print(json.dumps({"doc": d, "method": method, **summary(rows[-args.facts :])[method]}), flush=True)
    meta = provenance("benchmarks/session_questions.py", vars(args))
    summ = summary(rows)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "session_questions.json").write_text(
        json.dumps({"meta": meta, "summary": summ, "rows": rows}, indent=1)
    )
    (args.out / "README.md").write_text(markdown(meta, summ))
    print(markdown(meta, summ))


if __name__ == "__main__":
    main()
