"""Pages the first boundary chooses on planted-fact prompts, next to where the fact lies and how its chunks rank.

usage: python first_boundary_pages.py MODEL LENGTH SEED,SEED,...
"""

import sys

import torch

import flashmemory.attention.cycle as cyc
from flashmemory import LSAConfig, generate
from flashmemory.bench.planted_fact import planted_fact
from flashmemory.runtime.ask import load_on

model, tok = load_on(sys.argv[1], "cpu", progress=False)
L = int(sys.argv[2])
seeds = [int(x) for x in sys.argv[3].split(",")]
log = []
orig = cyc.select_pages


def spy(scores, **kw):
    out = orig(scores, **kw)
    log.append((scores.clone(), out.clone(), kw))
    return out


cyc.select_pages = spy
for s in seeds:
    pf = planted_fact(tok, L, seed=s)
    templ = tok.apply_chat_template(
        [{"role": "user", "content": pf.prompt}], tokenize=False, add_generation_prompt=True
    )
    enc = tok(templ, return_offsets_mapping=True, add_special_tokens=False)
    fs = templ.index("The access code")
    ans = templ.index(pf.answer, fs)
    fe = ans + len(pf.answer)
    toks = [i for i, (a, b) in enumerate(enc["offset_mapping"]) if a < fe and b > fs]
    for budget in (0.2, 0.3):
        log.clear()
        r = generate(model, tok, pf.prompt, method="lsa", lsa=LSAConfig(budget=budget), max_new_tokens=16)
        sc, pages, kw = log[0]
        sc = sc[0]
        n_sel = kw["num_selectable"] * 4
        order = torch.argsort(sc[:n_sel], descending=True)
        fc = sorted({t // 16 for t in toks})
        ranks = [int((order == c).nonzero()[0]) for c in fc]
        print(
            s,
            budget,
            pf.is_correct(r.text),
            repr(r.text.strip()[:50]),
            "fact tokens",
            toks[0],
            toks[-1],
            "pages",
            sorted({t // 64 for t in toks}),
            "chosen",
            pages[0].tolist(),
            "selectable",
            kw["num_selectable"],
            "fact chunk ranks",
            ranks,
            "top chunks",
            order[:8].tolist(),
            flush=True,
        )
