"""Where the shipped SmolLM2 tower and its feedback head rank a planted fact's chunk at the first boundary.

    python needle_ranks.py LENGTH SEED

Runs one held-out planted fact through LSA and, at the turn's first boundary, ranks the chunk holding the answer by
the tower's probability, by the head's (as if the head chose there) and by the prompt-window consensus count.
"""

import sys

import torch

import flashmemory.attention.cache as cache_module
from flashmemory.bench.planted_fact import planted_fact
from flashmemory.config import LSAConfig
from flashmemory.dump.runner import encode_chat
from flashmemory.indexer.feedback import logit_of
from flashmemory.runtime.ask import load_on
from flashmemory.runtime.generate import generate

length, seed = int(sys.argv[1]), int(sys.argv[2])
model, tok = load_on("smollm2-135m", "cpu", progress=False)
task = planted_fact(tok, length, seed=seed)
first: dict[str, torch.Tensor] = {}
score_chunks = cache_module.LSACache._score_chunks


def recording(self):
    out = score_chunks(self)
    if not first:
        probs = self.indexer.score(
            self.lookahead,
            self.lookahead_pos,
            self.chunk_keys.stacked(),
            self.layer_reduce,
            window_mask=self.lookahead_valid,
            chunk_offset=self.store.pad_len,
        )
        feats = self.feedback.features(logit_of(probs), self.store.seq_len - 1)
        first.update(tower=probs[0], head=torch.sigmoid(self.indexer.feedback(feats))[0], prompt=feats[0, :, 1])
    return out


cache_module.LSACache._score_chunks = recording
res = generate(model, tok, task.prompt, method="lsa", lsa=LSAConfig(budget=0.2), max_new_tokens=16)
ids = encode_chat(tok, task.prompt)[0].tolist()
answer = tok(" " + task.answer, add_special_tokens=False)["input_ids"]
pos = next(i for i in range(len(ids)) if ids[i : i + len(answer)] == answer)
chunk = pos // 16
print(f"{length} tokens, seed {seed}: answer {task.answer!r} at token {pos} (chunk {chunk} of {len(first['tower'])})")
print(f"shipped runtime answered {res.text.strip()!r} ({'correct' if task.is_correct(res.text) else 'wrong'})")
for name, scores in first.items():
    rank = int((torch.argsort(scores, descending=True) == chunk).nonzero()[0])
    print(f"  {name:6s} ranks it {rank + 1} (score {float(scores[chunk]):.3f})")
