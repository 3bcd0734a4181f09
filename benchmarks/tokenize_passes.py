"""What tokenising a long context costs: one pass of ``question_ids`` (the prompt ``ask`` and ``/v1/ask`` check
and answer) at several context lengths, with the model's real tokenizer.

A request with N questions about one context tokenises it N+2 times (each prompt once, plus a session's context
prefix and its length; counted by ``tests/runtime/test_ask_questions.py`` and ``tests/serve/test_app.py``); before
``question_ids`` was handed on, it was 2N+2. The table gives both totals from the measured pass. One question
without a session is one pass (``ask`` made two before, ``/v1/ask`` one).

    python benchmarks/tokenize_passes.py --model smollm2-135m --lengths 8192,32768,131072 --questions 2,4,8 \
        --out benchmarks/results/tokenize_passes_cpu
"""

from __future__ import annotations

import argparse
import json
import statistics
import sysconfig
import time
from pathlib import Path

from transformers import AutoTokenizer

from flashmemory.bench.record import provenance, provenance_lines
from flashmemory.models.loader import prepare_model_folder
from flashmemory.runtime.session import question_ids


def corpus(tokenizer, tokens: int) -> str:
    """At least ``tokens`` tokens of Python's own library sources, cut to that many."""
    texts, have = [], 0
    for path in sorted(Path(sysconfig.get_paths()["stdlib"]).rglob("*.py")):
        text = path.read_text(encoding="utf-8", errors="ignore")
        texts.append(text)
        have += len(text) // 3
        if have > tokens * 1.5:
            break
    ids = tokenizer("".join(texts), add_special_tokens=False)["input_ids"][:tokens]
    if len(ids) < tokens:
        raise ValueError(f"only {len(ids)} tokens of text found, {tokens} asked for")
    return tokenizer.decode(ids)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--lengths", default="8192,32768,131072")
    ap.add_argument("--questions", default="2,4,8")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    tokenizer = AutoTokenizer.from_pretrained(prepare_model_folder(args.model))
    questions = [int(n) for n in args.questions.split(",")]
    rows = []
    for length in (int(n) for n in args.lengths.split(",")):
        context = corpus(tokenizer, length)
        question_ids(tokenizer, context, "warm-up?")
        times = []
        for r in range(args.repeats):
            t0 = time.perf_counter()
            ids = question_ids(tokenizer, context, f"question {r}?")
            times.append(time.perf_counter() - t0)
        one = statistics.median(times)
        row = {"context_tokens": length, "prompt_tokens": int(ids.shape[1]), "pass_seconds": one, "times": times}
        row["by_questions"] = {n: {"now": (n + 2) * one, "before": (2 * n + 2) * one} for n in questions}
        rows.append(row)
        print(f"{length}: {one:.3f} s per pass")
    report = {**provenance(__file__, vars(args)), "model": args.model, "rows": rows}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "tokenize_passes.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    head = " | ".join(f"{n} questions: now / before" for n in questions)
    lines = [
        f"# Tokenising a long context ({args.model}'s tokenizer)",
        "",
        *provenance_lines(report),
        "",
        f"Median of {args.repeats} passes of `question_ids`, host time; the totals for N questions over one session",
        "are N+2 passes (now) and 2N+2 (before).",
        "",
        f"| context tokens | one pass (s) | {head} |",
        "|---:|---:|" + "---:|" * len(questions),
    ]
    for row in rows:
        cells = " | ".join(
            f"{row['by_questions'][n]['now']:.2f} / {row['by_questions'][n]['before']:.2f}" for n in questions
        )
        lines.append(f"| {row['context_tokens']:,} | {row['pass_seconds']:.3f} | {cells} |")
    (args.out / "README.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
