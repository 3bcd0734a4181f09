"""A document's keys and values saved to disk and read back, against prefilling the document again.

Per document and method (full attention, LSA with the shipped indexer), three sessions answer the same planted-fact
questions one after another: one without a cache (the prefill), one with an empty cache folder (the prefill, then
the save), and one reading that folder (no prefill). Recorded: the ratio of the prefilling session's time to the
reading session's, to the first answer and to the last; the prefill's and the save's seconds; the folder's size;
and whether every answer is token for token the one of the session that prefilled. safetensors maps the files, so
their bytes are read when the first question's prefill touches them, and a folder just written is still in the
operating system's page cache: a cold read is bounded by the disk.

    python benchmarks/session_kv_cache.py --model smollm2-135m --length 7680 --docs 3 --facts 3 \
        --out benchmarks/results/session_kv_cache_smollm2_cpu
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

from flashmemory import LSAConfig, Session
from flashmemory.bench.planted_fact import planted_facts
from flashmemory.bench.record import provenance, provenance_lines
from flashmemory.runtime.ask import load_on


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.iterdir())


def timed_session(model, tok, document, items, max_new_tokens: int, **kw) -> tuple[Session, list, float, float]:
    """A session answering every question: the session, its answers, seconds to the first answer and in all."""
    t0 = time.perf_counter()
    session = Session(model, tok, document, **kw)
    answers = [session.ask(items[0].question, max_new_tokens=max_new_tokens)]
    first = time.perf_counter() - t0
    answers += [session.ask(it.question, max_new_tokens=max_new_tokens) for it in items[1:]]
    return session, answers, first, time.perf_counter() - t0


def run_doc(model, tok, items, method: str, lsa: LSAConfig | None, max_new_tokens: int, cache: Path) -> dict:
    document = items[0].document
    kw = dict(method=method, lsa=lsa, cuda_graph=False)
    plain, want, plain_first, plain_all = timed_session(model, tok, document, items, max_new_tokens, **kw)
    saving, saved, _, _ = timed_session(model, tok, document, items, max_new_tokens, kv_cache=cache, **kw)
    reading, read, read_first, read_all = timed_session(
        model, tok, document, items, max_new_tokens, kv_cache=cache, **kw
    )
    assert not saving.loaded and reading.loaded
    return {
        "method": method,
        "context_tokens": want[0].stats.context_tokens,
        "prefix_tokens": plain.prefix.length,
        "prefill_seconds": plain.prefill_seconds,
        "save_seconds": saving.save_seconds,
        "first_answer_seconds_prefilled": plain_first,
        "first_answer_seconds_read": read_first,
        "all_answers_seconds_prefilled": plain_all,
        "all_answers_seconds_read": read_all,
        "first_answer_ratio": plain_first / read_first,
        "all_answers_ratio": plain_all / read_all,
        "folder_bytes": folder_bytes(saving.kv_folder),
        "prefix_host_bytes": plain.prefix.host_bytes,
        "same_tokens_saving": all(a.token_ids == b.token_ids for a, b in zip(want, saved, strict=True)),
        "same_tokens_read": all(a.token_ids == b.token_ids for a, b in zip(want, read, strict=True)),
        "correct": sum(it.answer.lower() in a.text.lower() for it, a in zip(items, read, strict=True)),
        "questions": len(items),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--length", type=int, default=7680)
    ap.add_argument("--docs", type=int, default=3)
    ap.add_argument("--facts", type=int, default=3)
    ap.add_argument(
        "--seed", type=int, default=500, help="the first document's seed; each next document takes the next one"
    )
    ap.add_argument("--budget", type=float, default=0.2)
    ap.add_argument("--max-new-tokens", type=int, default=16)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    model, tok = load_on(args.model, args.device, progress=True)
    report = {**provenance("benchmarks/session_kv_cache.py", vars(args) | {"out": str(args.out)}), "rows": []}
    cache = Path(tempfile.mkdtemp(prefix="fm-kv-"))
    try:
        for d in range(args.docs):
            items = planted_facts(tok, args.length, args.facts, seed=args.seed + d)
            for method, lsa in (("full", None), ("lsa", LSAConfig(budget=args.budget))):
                row = run_doc(model, tok, items, method, lsa, args.max_new_tokens, cache) | {"doc": d}
                report["rows"].append(row)
                print(json.dumps(row), flush=True)
                (args.out / "session_kv_cache.json").write_text(json.dumps(report, indent=1))
    finally:
        shutil.rmtree(cache, ignore_errors=True)
    (args.out / "README.md").write_text(markdown(report))


def markdown(report: dict) -> str:
    lines = [
        "# A document's keys and values read from disk against prefilling it again",
        "",
        *provenance_lines(report),
        "",
        "| doc | method | context tokens | prefill s | first answer: prefilled / read | all answers: prefilled / read "
        "| save s | folder MiB | same answers (saving / read) | correct |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---|---:|",
    ]
    for r in report["rows"]:
        lines.append(
            f"| {r['doc']} | {r['method']} | {r['context_tokens']} | {r['prefill_seconds']:.2f} | "
            f"{r['first_answer_ratio']:.1f}x | {r['all_answers_ratio']:.1f}x | {r['save_seconds']:.2f} | "
            f"{r['folder_bytes'] / 2**20:.1f} | {r['same_tokens_saving']} / {r['same_tokens_read']} | "
            f"{r['correct']}/{r['questions']} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
