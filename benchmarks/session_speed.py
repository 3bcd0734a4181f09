"""Time to answer several questions about one long context: one request per question against one Session.

A random-weight model with a real shape (time does not depend on weight values) reads a context of ``--contexts``
tokens and answers ``--questions`` short questions, per method (full attention, LSA at ``--budget``), both ways in
one run, alternating which goes first: as separate requests (``flashmemory.generate``, the whole prompt prefilled
for each) and through one :class:`flashmemory.Session` (the context prefilled once, each question against it).
Recorded per context and method: seconds each way, their ratio, the session's one-time context prefill and its
mean per-question time, the host bytes the session keeps for the context, the peak device memory the allocator saw,
and the share of answers that came out token for token the same (bf16 on a GPU: the context's keys computed in a
forward of their own may round differently from the same keys inside a whole-prompt forward).

Both methods answer one short warm-up prompt both ways before anything is timed. Text goes through a byte
tokenizer: one id per byte, so the context is exactly ``--contexts`` tokens.

    python benchmarks/session_speed.py --shape llama3-8b --contexts 32768,131072 --questions 4 \
        --out benchmarks/results/session_speed_h200
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

import torch
from decode_speed import SHAPES
from transformers import AutoModelForCausalLM

from flashmemory import LSAConfig, Session, generate
from flashmemory.bench.record import provenance, provenance_lines
from flashmemory.runtime.session import build_prompt

WORDS = "the of river lamp seven copper window north quiet market garden under letter bright station".split()


class ByteTokenizer:
    """One id per UTF-8 byte (ids 3-258); ids 0-2 are pad, end of text and unused."""

    chat_template = None
    eos_token_id = 1
    eos_token = "\x01"
    pad_token = None
    padding_side = "left"

    def __call__(self, text, return_tensors=None, add_special_tokens=True, padding=False):
        rows = [[b + 3 for b in t.encode()] for t in ([text] if isinstance(text, str) else text)]
        width = max(len(r) for r in rows)
        ids = [[0] * (width - len(r)) + r for r in rows]
        mask = [[0] * (width - len(r)) + [1] * len(r) for r in rows]
        return {"input_ids": torch.tensor(ids), "attention_mask": torch.tensor(mask)}

    def decode(self, ids, skip_special_tokens=True):
        return bytes(i - 3 for i in ids if 3 <= i < 259).decode(errors="replace")


def random_weight_model(shape: str, layers: int | None = None):
    """A bf16 model of a real shape on the GPU, with random weights (time does not depend on their values)."""
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(
            SHAPES[shape](layers), dtype=torch.bfloat16, attn_implementation="sdpa"
        ).eval()
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(0, 0.02)
    return model


def text_of(tokens: int, rng: random.Random) -> str:
    words, size = [], 0
    while size < tokens:
        words.append(rng.choice(WORDS))
        size += len(words[-1]) + 1
    return " ".join(words)[:tokens]


def timed(fn):
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    out = fn()
    torch.cuda.synchronize()
    return out, time.perf_counter() - t0


def run(model, tok, context: str, questions: list[str], method: str, lsa, max_new: int, session_first: bool) -> dict:
    kw = dict(method=method, lsa=lsa, indexer="zero-shot" if method == "lsa" else None, chat=False, cuda_graph=False)

    def separately():
        return [generate(model, tok, build_prompt(context, q), max_new_tokens=max_new, **kw) for q in questions]

    def in_session():
        session = Session(model, tok, context, **kw)
        answers = [session.ask(q, max_new_tokens=max_new) for q in questions]
        return session, answers

    timings = {}
    torch.cuda.reset_peak_memory_stats()
    for name, fn in (("session", in_session), ("separate", separately))[:: 1 if session_first else -1]:
        torch.cuda.reset_peak_memory_stats()
        timings[name] = timed(fn) + (torch.cuda.max_memory_allocated(),)
    separate, separate_s, separate_peak = timings["separate"]
    (session, answers), session_s, session_peak = timings["session"]
    return {
        "method": method,
        "questions": len(questions),
        "separate_seconds": separate_s,
        "session_seconds": session_s,
        "speedup": separate_s / session_s,
        "context_prefill_seconds": session.prefill_seconds,
        "session_seconds_per_question": (session_s - session.prefill_seconds) / len(questions),
        "separate_seconds_per_question": separate_s / len(questions),
        "prefix_host_bytes": session.prefix.host_bytes,
        "peak_device_bytes_separate": separate_peak,
        "peak_device_bytes_session": session_peak,
        "kv_ratio": sum(a.stats.kv_ratio for a in answers) / len(answers),
        "same_tokens": sum(a.token_ids == b.token_ids for a, b in zip(separate, answers, strict=True)) / len(answers),
        "session_first": session_first,
    }


def markdown(report: dict) -> str:
    lines = [
        "# Several questions over one long context: separate requests vs one Session (random weights, real shape)",
        "",
        *provenance_lines(report),
        "",
        "| context | method | round | first | questions | separate s | session s | separate / session "
        "| context prefill s | per question s (session / separate) | same tokens | device KV |",
        "|---:|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in report["rows"]:
        lines.append(
            f"| {r['context']} | {r['method']} | {r.get('round', 0)} | "
            f"{'session' if r['session_first'] else 'separate'} | {r['questions']} | {r['separate_seconds']:.2f} | "
            f"{r['session_seconds']:.2f} | {r['speedup']:.2f}x | {r['context_prefill_seconds']:.2f} | "
            f"{r['session_seconds_per_question']:.2f} / {r['separate_seconds_per_question']:.2f} | "
            f"{r['same_tokens']:.0%} | {r['kv_ratio']:.1%} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="llama3-8b", choices=sorted(SHAPES))
    ap.add_argument("--layers", type=int, default=None, help="decoder layers (default: the shape's own)")
    ap.add_argument("--contexts", default="32768,131072")
    ap.add_argument("--questions", type=int, default=4)
    ap.add_argument("--max-new-tokens", type=int, default=16)
    ap.add_argument("--budget", type=float, default=0.15)
    ap.add_argument("--methods", default="lsa,full")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--repeats", type=int, default=1, help="rounds per context and method, alternating the order")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("this benchmark times a GPU; run it on a machine with CUDA")
    report = {**provenance("benchmarks/session_speed.py", vars(args) | {"out": str(args.out)}), "rows": []}
    torch.manual_seed(args.seed)
    model = random_weight_model(args.shape, args.layers)
    tok, rng = ByteTokenizer(), random.Random(args.seed)
    lsa = LSAConfig(budget=args.budget)
    args.out.mkdir(parents=True, exist_ok=True)
    # kernels compile and libraries initialise on first use: let that happen before anything is timed
    for method in args.methods.split(","):
        run(model, tok, text_of(4096, rng), ["warm up?"], method, lsa if method == "lsa" else None, 4, True)
    for i, context in enumerate(int(c) for c in args.contexts.split(",")):
        # the template and the question add tokens; the context itself is sized to leave room for them
        text = text_of(context, rng)
        questions = [f"Which word follows the {n + 1}-th '{rng.choice(WORDS)}'?" for n in range(args.questions)]
        rounds = [(r, m) for r in range(args.repeats) for m in args.methods.split(",")]
        for j, (r, method) in enumerate(rounds):
            row = run(
                model,
                tok,
                text,
                questions,
                method,
                lsa if method == "lsa" else None,
                args.max_new_tokens,
                session_first=(i + j + r) % 2 == 0,
            )
            row["context"], row["round"] = context, r
            report["rows"].append(row)
            print(json.dumps(row), flush=True)
            (args.out / "session_speed.json").write_text(json.dumps(report, indent=1))
            (args.out / "README.md").write_text(markdown(report))


if __name__ == "__main__":
    main()
