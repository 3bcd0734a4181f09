"""Which page choice finds RULER's needles: the first boundary's pages under variants of the zero-shot scorer.

For each RULER sample, one prefill through an ``LSACache`` that keys every full-attention layer gives the chunk
keys and the lookahead hidden states of all layers. The first boundary's page choice is then replayed offline for
several scorers (which layers, max or mean over them, how many query tokens; chunks scored by their mean keys, or
by their best token as with ``first_boundary_keys="token"``), at the number of page slots the bench's reserve has
for the same prompt and budget, and checked against the pages that hold the answer: an answer counts as covered
when every token of one of its occurrences is resident (in a chosen page, the sink or the recent tail). No
decoding: this isolates the page choice from everything after it. Use RULER's dev seed (1), never the seed of the
recorded grid (0). Folders recorded before the slots followed the bench's used fewer (their READMEs say how many).

Usage: ``python3 benchmarks/needle_pages.py --out DIR [--model qwen2.5-coder-0.5b --length 4096 --samples 6]
[--ckpt FOLDER ...]``. Each ``--ckpt`` adds rows for a trained indexer, scored by its own query tower on its own
target layers with chunk keys and with token keys.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from collections import defaultdict
from dataclasses import replace
from pathlib import Path

import torch

from flashmemory.attention.cache import LSACache
from flashmemory.bench.ruler import generate_ruler
from flashmemory.bench.runner import chat_prompt, default_loader, encode_sample
from flashmemory.config import LSAConfig
from flashmemory.indexer.checkpoint import load_indexer
from flashmemory.indexer.scoring import select_pages
from flashmemory.memory.layout import plan_layout
from flashmemory.models.adapter import apply_rope, backbone_spec
from flashmemory.models.loader import model_fingerprint

TASKS = "niah_single_1,niah_single_3,niah_multikey_2,niah_multivalue,niah_multiquery,vt"


def answer_spans(tokenizer, text: str, outputs: list[str], before: int) -> list[list[tuple[int, int]]]:
    """Token spans ``[start, end)`` of every occurrence of each answer that starts before token ``before``."""
    enc = tokenizer(text, return_offsets_mapping=True, add_special_tokens=False)
    offsets = enc["offset_mapping"]
    spans = []
    for out in outputs:
        found, at = [], text.find(out)
        while at >= 0:
            toks = [i for i, (a, b) in enumerate(offsets) if a < at + len(out) and b > at]
            if toks and toks[0] < before:
                found.append((toks[0], toks[-1] + 1))
            at = text.find(out, at + 1)
        spans.append(found)
    return spans


def covered(span: tuple[int, int], pages: set[int], page_size: int, sink: int, tail_start: int) -> bool:
    """Whether every token of ``span`` is resident: in the sink, the recent tail or one of ``pages``."""
    return all(t < sink or t >= tail_start or t // page_size in pages for t in range(*span))


def variants(
    spec_layers: tuple[int, ...], default: tuple[int, ...], reduce: str
) -> dict[str, tuple[tuple[int, ...], str, int, str]]:
    """name -> (layers, reduce, query tokens, keys: "chunk" means, each chunk's best "token", or the backbone's
    own "attention-mean" / "attention-max" mass per chunk, over heads)."""
    n = len(spec_layers)
    # the zero-shot default of earlier versions, kept as a reference row
    earlier = tuple(sorted({spec_layers[min(n - 1, int(f * n))] for f in (0.5, 0.67, 0.84)}))
    band = spec_layers[int(0.45 * n) : int(0.7 * n) + 1]
    out = {
        f"default ({len(default)} layers, {reduce}, 16)": (default, reduce, 16, "chunk"),
        f"default ({len(default)} layers, {reduce}, 16), token keys": (default, reduce, 16, "token"),
        "earlier default (50/67/84% depth, max, 16)": (earlier, "max", 16, "chunk"),
        "earlier default, 64 query tokens": (earlier, "max", 64, "chunk"),
        "earlier default, mean": (earlier, "mean", 16, "chunk"),
        "all layers, max": (spec_layers, "max", 16, "chunk"),
        "all layers, mean": (spec_layers, "mean", 16, "chunk"),
        "lower half, max": (spec_layers[: n // 2], "max", 16, "chunk"),
        "upper half, max": (spec_layers[n // 2 :], "max", 16, "chunk"),
        "middle third, max": (spec_layers[n // 3 : 2 * n // 3], "max", 16, "chunk"),
        "45-70% depth, max": (band, "max", 16, "chunk"),
        "45-70% depth, mean": (band, "mean", 16, "chunk"),
        "45-70% depth, mean, token keys": (band, "mean", 16, "token"),
    }
    for head in ("mean", "max"):
        att = f"attention-{head}"
        out[f"attention mass (heads {head}), all layers, mean"] = (spec_layers, "mean", 16, att)
        out[f"attention mass (heads {head}), all layers, max"] = (spec_layers, "max", 16, att)
        out[f"attention mass (heads {head}), 45-70% depth, mean"] = (band, "mean", 16, att)
        out[f"attention mass (heads {head}), default layers"] = (default, reduce, 16, att)
        out[f"attention mass (heads {head}), upper half, mean"] = (spec_layers[n // 2 :], "mean", 16, att)
    for layer in spec_layers:
        out[f"layer {layer}"] = ((layer,), "max", 16, "chunk")
    for layer in spec_layers:
        out[f"layer {layer}, token keys"] = ((layer,), "max", 16, "token")
    return out


def attention_mass(indexer, j: int, hidden, pos, valid, token_keys, chunk_size: int, n: int) -> dict[str, torch.Tensor]:
    """The backbone's own attention of the window's tokens at one layer, as mass per chunk. # {reduce: [B, N]}

    Queries are the layer's ``q_proj`` (the zero-shot tower) with its rotary embedding, keys the prefill's keys of
    every token, softmax over the whole prefix as the layer computes it (causal inside the window). Mass is
    summed over the chunk's tokens and averaged over the window; then either averaged over heads ("mean") or the
    best head taken ("max").
    """
    spec = indexer.spec
    q, _ = indexer.tower(j, hidden.to(indexer.tower.q_proj[j].weight.dtype))
    q = apply_rope(q, pos, indexer.inv_freq[j], spec.rope_scaling[j])  # [B, W, H, D]
    b, w, h, d = q.shape
    keys = token_keys.to(q.device).float().repeat_interleave(h // token_keys.shape[1], dim=1)  # [B, H, T, D]
    t = keys.shape[2]
    logits = torch.einsum("bwhd,bhtd->bhwt", q.float(), keys) / math.sqrt(d)
    future = torch.arange(t)[None, :] > pos[0][:, None]  # the window's tokens see only their own prefix
    probs = logits.masked_fill(future[None, None], float("-inf")).softmax(-1)
    probs = probs.masked_fill(~valid[:, None, :, None], 0.0)
    mass = probs[..., : n * chunk_size].reshape(b, h, w, n, chunk_size).sum(-1).mean(2)  # [B, H, N]
    return {"mean": mass.mean(1), "max": mass.amax(1)}


def bench_page_slots(cache: LSACache, lsa: LSAConfig, default_layers: int, prompt_len: int, new_tokens: int) -> int:
    """Page slots of the bench's reserve for this prompt: the same budget, with chunk keys of the default layers only.

    The replay keys every full-attention layer so that one prefill serves every scorer; counting all those chunk
    keys against the budget would leave fewer slots than `flashmemory bench` has.
    """
    elem = cache.store.mirror_k[cache.targets[0]].element_size()
    seq = cache.sequence_bytes(elem)
    seq = replace(seq, per_chunk_key=seq.per_chunk_key // len(cache.targets) * default_layers)
    full_other = cache._other_bytes(prompt_len, elem)
    layout = plan_layout(
        lsa, seq, context_len=prompt_len, max_len=prompt_len + new_tokens, other_layers_full=full_other
    )
    return layout.num_page_slots


@torch.no_grad()
def run(args) -> dict:
    model, tok = default_loader(args.model, args.device)
    spec = backbone_spec(model)
    all_layers = tuple(spec.full_layers)
    # token keys: the first boundary's scorer reads every layer's prompt keys back from the store's host mirror
    lsa = LSAConfig(budget=args.budget, target_layers=all_layers, query_window=64, first_boundary_keys="token")
    lsa = lsa.with_page_chunks(spec.default_page_chunks())
    default = spec.default_target_layers()
    names = variants(all_layers, default, spec.default_layer_reduce())
    # trained indexers, each scored with its own query tower on its own target layers (mean over them, as saved)
    trained = {
        Path(c).name: load_indexer(c, fingerprint=model_fingerprint(model), device=model.device) for c in args.ckpt
    }
    for label, ix in trained.items():
        for mode in ("chunk", "token"):
            names[f"checkpoint {label}, {mode} keys"] = (tuple(ix.target_layers), "mean", 16, f"ckpt:{label}:{mode}")
    per_task: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    started = time.time()
    for task in args.tasks.split(","):
        samples = generate_ruler(task, tok, length=args.length, num_samples=args.samples, seed=args.seed)
        for sample in samples:
            enc = encode_sample(tok, sample.input, sample.answer_prefix)
            text = chat_prompt(tok, sample.input, sample.answer_prefix)  # the model has a chat template
            ids = enc["input_ids"]
            assert tok(text, add_special_tokens=False)["input_ids"] == ids[0].tolist()
            with LSACache(model, lsa, max_new_tokens=sample.max_new_tokens) as cache:
                model(input_ids=ids.to(model.device), past_key_values=cache, use_cache=True, logits_to_keep=1)
                store = cache.store
                page = lsa.page_size
                k = bench_page_slots(cache, lsa, len(default), ids.shape[1], sample.max_new_tokens)
                selectable = store.selectable_pages()
                spans = answer_spans(tok, text, sample.outputs, before=store.tail_start)
                keys = dict(zip(cache.targets, cache.chunk_keys.stacked(), strict=True))
                prompt_keys = {layer: store.mirror_k[layer][:, :, : cache.token_keys_len] for layer in cache.targets}
                n = next(iter(keys.values())).shape[2]
                sink = torch.zeros(1, n, dtype=torch.bool)
                sink[:, : lsa.sink // lsa.chunk_size] = True
                logits = {}
                for window, mode in ((16, "chunk"), (64, "chunk"), (16, "token")):
                    pos, valid = cache.lookahead_pos[:, -window:], cache.lookahead_valid[:, -window:]
                    for j, layer in enumerate(cache.targets):
                        hidden = cache.lookahead[layer][:, -window:]
                        token = prompt_keys[layer] if mode == "token" else None
                        logits[(layer, window, mode)] = cache.indexer.layer_logits(
                            j, hidden, pos, keys[layer], valid, token_keys=token
                        )
                pos, valid = cache.lookahead_pos[:, -16:], cache.lookahead_valid[:, -16:]
                for label, ix in trained.items():
                    for j, layer in enumerate(ix.target_layers):
                        hidden = cache.lookahead[layer][:, -16:]
                        for mode in ("chunk", "token"):
                            token = prompt_keys[layer] if mode == "token" else None
                            logits[(layer, 16, f"ckpt:{label}:{mode}")] = ix.layer_logits(
                                j, hidden, pos, keys[layer], valid, token_keys=token
                            )
                for j, layer in enumerate(cache.targets):
                    mass = attention_mass(
                        cache.indexer,
                        j,
                        cache.lookahead[layer][:, -16:],
                        pos,
                        valid,
                        prompt_keys[layer],
                        lsa.chunk_size,
                        n,
                    )
                    for head_reduce, m in mass.items():
                        logits[(layer, 16, f"attention-{head_reduce}")] = m
                for name, (layers, reduce, window, mode) in names.items():
                    if mode.startswith("attention"):  # masses, not logits: averaged or maxed as they are
                        probs = torch.stack([logits[(layer, window, mode)] for layer in layers])
                    else:
                        probs = torch.stack([torch.sigmoid(logits[(layer, window, mode)]) for layer in layers])
                    scores = (probs.amax(0) if reduce == "max" else probs.mean(0)).masked_fill(sink, 0.0)
                    pages = select_pages(
                        scores,
                        num_selectable=selectable,
                        page_chunks=lsa.page_chunks,
                        num_slots=k,
                        threshold=lsa.threshold,
                        top_m=math.ceil(lsa.best_chunk_slots * min(k, selectable)),
                    )[0]
                    resident = {int(p) for p in pages if p >= 0}
                    tail = store.tail_start
                    hits = [any(covered(s, resident, page, lsa.sink, tail) for s in occ) for occ in spans if occ]
                    if hits:
                        per_task[task][name].append(sum(hits) / len(hits))
            print(f"{task} #{sample.index}: {time.time() - started:.0f} s, {k} page slots", flush=True)
    return {
        "args": vars(args),
        "page_slots_note": "the bench's page slots at this budget and length (chunk keys of the default layers)",
        "default_layers": list(default),
        "tasks": {t: {v: sum(x) / len(x) for v, x in d.items()} for t, d in per_task.items()},
        "samples": {t: len(next(iter(d.values()))) for t, d in per_task.items()},
    }


def markdown(report: dict) -> str:
    tasks = list(report["tasks"])
    names = list(next(iter(report["tasks"].values())))
    a = report["args"]
    lines = [
        f"# Answers covered by the first boundary's pages ({a['model']}, {a['length']} tokens, budget "
        f"{a['budget']}, RULER seed {a['seed']})",
        "",
        "Share of answers with one occurrence wholly resident after the first boundary; samples per task: "
        + ", ".join(f"{t} {report['samples'][t]}" for t in tasks)
        + f". Default target layers: {report['default_layers']}.",
        "",
        "| scorer | " + " | ".join(tasks) + " | mean |",
        "|---|" + "---:|" * (len(tasks) + 1),
    ]
    for name in names:
        vals = [report["tasks"][t][name] for t in tasks]
        lines.append(f"| {name} | " + " | ".join(f"{v:.2f}" for v in vals) + f" | {sum(vals) / len(vals):.2f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--model", default="qwen2.5-coder-0.5b")
    p.add_argument("--tasks", default=TASKS)
    p.add_argument("--length", type=int, default=4096)
    p.add_argument("--samples", type=int, default=5)
    p.add_argument("--seed", type=int, default=1, help="RULER dev seed; the recorded grid uses 0")
    p.add_argument("--budget", type=float, default=0.15)
    p.add_argument("--device", default="cpu")
    p.add_argument("--ckpt", action="append", default=[], help="a trained indexer folder to score as well (repeatable)")
    args = p.parse_args()
    if args.seed == 0:
        raise SystemExit("seed 0 is the recorded RULER grid's: tune scorers on another seed")
    report = run(args)
    if not report["tasks"]:
        # every answer sat in the sink or the recent tail, which are resident whatever the scorer chooses
        raise SystemExit(f"no sample had an answer outside the sink and recent tail at {args.length} tokens")
    args.out.mkdir(parents=True, exist_ok=True)
    report["args"] = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    (args.out / "needle_pages.json").write_text(json.dumps(report, indent=1))
    (args.out / "needle_pages.md").write_text(markdown(report))
    print(markdown(report))


if __name__ == "__main__":
    main()
