"""``flashmemory demo``: a planted fact answered by full attention and by LSA."""

from __future__ import annotations

from rich.console import Console

from ..bench.planted_fact import planted_fact
from ..config import LSAConfig
from ..runtime.ask import check_length, load_on, stats_record
from ..runtime.generate import encode_prompts, generate_encoded


def run_demo(
    model_name: str,
    *,
    context_tokens: int,
    lsa: LSAConfig,
    seed: int,
    device: str,
    indexer: str = "auto",
    console: Console | None = None,
) -> dict:
    """Answer one planted-fact question with ``full`` and ``lsa``; returns rows for a table."""
    if context_tokens < 256:
        raise ValueError(f"--context-tokens must be >= 256, got {context_tokens}")
    model, tokenizer = load_on(model_name, device)
    task = planted_fact(tokenizer, context_tokens, seed=seed)
    ids = encode_prompts(tokenizer, [task.prompt], chat=True)["input_ids"]  # checked, then answered both ways
    n = check_length(model, ids, 32)
    rows = {}
    # LSA first: a budget it cannot keep is refused before full attention's answer is computed and lost
    for method in ("lsa", "full"):
        if console is not None:
            console.log(f"answering with {method}...")
        result = generate_encoded(model, tokenizer, ids, method=method, lsa=lsa, indexer=indexer, max_new_tokens=32)
        rows[method] = stats_record(result.text.strip(), result.stats)
        rows[method]["correct"] = task.is_correct(result.text)
    return {
        "question": task.question,
        "expected": task.answer,
        "depth": task.depth,
        "context_tokens": n,
        "rows": [rows["full"], rows["lsa"]],
    }
