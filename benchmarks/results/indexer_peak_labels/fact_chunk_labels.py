"""Where the planted fact's chunk ranks under each way of turning attention into labels (SmolLM2, CPU).

For each dev seed: prefill a 2K planted-fact prompt, decode 24 greedy steps with full attention and, over those
steps (the lookahead of the first boundary), rank the candidate chunks that the golden labels keep by: layer hits,
layer hits where golden, golden steps, summed head-mean mass, and the peak single-head mass.

usage: python fact_chunk_labels.py [MODEL] [FIRST_SEED] [SEEDS]
"""

import sys

import torch
from transformers.cache_utils import DynamicCache

from flashmemory.bench.planted_fact import planted_fact
from flashmemory.dump.capture import AttentionRecorder
from flashmemory.dump.labels import top_p_mask
from flashmemory.runtime.ask import load_on

CHUNK, STEPS, TAIL = 16, 24, 64


def fact_chunks(tok, task) -> tuple[list[int], torch.Tensor]:
    text = task.prompt
    enc = tok(text, return_offsets_mapping=True, return_tensors="pt")
    start = text.index("The access code")
    end = text.index(".", text.index(task.answer))
    toks = [i for i, (a, b) in enumerate(enc.offset_mapping[0].tolist()) if a < end and b > start]
    return sorted({t // CHUNK for t in toks}), enc.input_ids


def main() -> None:
    name = sys.argv[1] if len(sys.argv) > 1 else "smollm2-135m"
    first = int(sys.argv[2]) if len(sys.argv) > 2 else 300
    count = int(sys.argv[3]) if len(sys.argv) > 3 else 8
    model, tok = load_on(name, "cpu", progress=False)
    for seed in range(first, first + count):
        task = planted_fact(tok, 2048, seed=seed)
        fc, ids = fact_chunks(tok, task)
        rec = AttentionRecorder(model, keep=1)
        cache = DynamicCache(config=model.config)
        with torch.no_grad():
            out = model(input_ids=ids, past_key_values=cache, use_cache=True)
            seq = ids.shape[1]
            n0 = (seq - TAIL) // CHUNK
            sums = {k: torch.zeros(n0) for k in ("hits", "hits_golden", "steps", "mass", "peak")}
            for _ in range(STEPS):
                n = seq // CHUNK
                per_head = []
                for layer in rec.layers:
                    p = rec.attention_probs(layer, cache.layers[layer].keys)
                    per_head.append(p[:, : n * CHUNK].view(p.shape[0], n, CHUNK).sum(-1))
                masks = torch.stack([top_p_mask(m.mean(0), 0.6) for m in per_head])[:, :n0]
                hits = masks.sum(0).float()
                golden = hits >= 3
                sums["hits"] += hits
                sums["hits_golden"] += hits * golden
                sums["steps"] += golden
                sums["mass"] += torch.stack([m.mean(0)[:n0] for m in per_head]).sum(0)
                peak = torch.stack([m.amax(0)[:n0] for m in per_head]).amax(0)
                sums["peak"] = torch.maximum(sums["peak"], peak)
                tok_id = int(out.logits[0, -1].argmax())
                out = model(input_ids=torch.tensor([[tok_id]]), past_key_values=cache, use_cache=True)
                seq += 1
        rec.remove()
        kept = sums["steps"] > 0
        kept[0] = False  # the sink chunk is always resident
        ranks = {}
        for key, v in sums.items():
            v = v.clone()
            v[~kept] = -1
            order = torch.argsort(v, descending=True)
            ranks[key] = min(int((order == c).nonzero()[0]) for c in fc)
        peak = sums["peak"].clone()
        peak[0] = 0
        above = {t: int((peak >= t).sum()) for t in (0.1, 0.2, 0.3, 0.5)}
        print(
            f"seed {seed}: golden {int(kept.sum())} of {n0 - 1} candidates; fact rank by {ranks}; "
            f"fact peak {float(peak[fc].max()):.2f}; chunks with peak >= t: {above}",
            flush=True,
        )


if __name__ == "__main__":
    main()
