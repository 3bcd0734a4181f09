"""Questions about one long text file: the engine behind ``flashmemory ask``."""

from __future__ import annotations

from pathlib import Path

import torch

from ..config import LSAConfig
from ..models import load_model
from .generate import METHODS, encode_prompts, generate
from .session import Session, build_prompt
from .stats import GenerationStats


def pick_device(device: str) -> torch.device:
    """``auto`` -> CUDA when available, else CPU; anything else is checked."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda was asked for but no CUDA device is available")
    return dev


def load_on(model_name: str, device: str = "auto", *, progress: bool = True):
    """Load a model for inference on ``device`` (``auto``/``cpu``/``cuda``): bf16 on CUDA, fp32 on the CPU."""
    dev = pick_device(device)
    dtype = torch.float32 if dev.type == "cpu" else torch.bfloat16
    return load_model(model_name, device=dev, dtype=dtype, progress=progress)


def read_context(path: str | Path) -> str:
    """The text of a context file, refusing missing, unreadable and empty files."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"context file not found: {path}")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(f"context file {path} is not UTF-8 text ({exc.reason})") from None
    if not text.strip():
        raise ValueError(f"context file {path} is empty")
    return text


def check_fits(model, tokenizer, prompt: str, max_new_tokens: int) -> int:
    """Prompt tokens; raises when prompt + new tokens exceed the model's context window."""
    n = int(encode_prompts(tokenizer, [prompt], chat=True)["input_ids"].shape[1])
    limit = getattr(model.config, "max_position_embeddings", None)
    if limit is not None and n + max_new_tokens > limit:
        raise ValueError(
            f"the context is {n} tokens and {max_new_tokens} more will be generated, but the model "
            f"handles at most {limit} tokens; shorten the context or lower --max-new-tokens"
        )
    return n


def stats_record(answer: str, stats: GenerationStats) -> dict:
    """The JSON object ``flashmemory ask --json`` prints."""
    record = {"answer": answer, **stats.to_dict()}
    return record


def check_options(method: str, max_new_tokens: int, cuda_graph: bool, device: str) -> None:
    """Refuse bad options before the model is loaded."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    if max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens must be >= 1, got {max_new_tokens}")
    if cuda_graph and method != "lsa":
        raise ValueError("--cuda-graph replays LSA decode steps; it needs --method lsa")
    if cuda_graph and pick_device(device).type != "cuda":
        raise ValueError("--cuda-graph needs a CUDA device (--device cuda or auto on a machine with one)")


def ask_file(model_name: str, context_file: str | Path, question: str, **options) -> dict:
    """Answer ``question`` about the text in ``context_file``; returns the answer with its accounting.

    ``options`` are :func:`ask_questions`'s.
    """
    return ask_questions(model_name, context_file, [question], **options)[0]


def ask_questions(
    model_name: str,
    context_file: str | Path,
    questions: list[str],
    *,
    method: str = "lsa",
    lsa: LSAConfig | None = None,
    max_new_tokens: int = 64,
    device: str = "auto",
    progress: bool = True,
    indexer: str = "auto",
    cuda_graph: bool = False,
    kv_cache: str | Path | None = None,
) -> list[dict]:
    """Answer questions about the text in ``context_file``: one request for one question, one :class:`Session`
    (one prefill of the context) for several, or for any number with ``kv_cache`` (a folder the session reads the
    context's keys and values from, or saves them into).

    Returns one record per question: its ``question``, the ``answer`` and the accounting (with ``kv_cache``,
    also ``context_kv``: the folder and whether the context was read from it).
    """
    if not questions or any(not q.strip() for q in questions):
        raise ValueError("the question is empty" if len(questions) == 1 else "a question is empty")
    check_options(method, max_new_tokens, cuda_graph, device)
    context = read_context(context_file)
    model, tokenizer = load_on(model_name, device, progress=progress)
    for q in questions:  # every question is checked before the context's prefill is spent
        check_fits(model, tokenizer, build_prompt(context, q), max_new_tokens)
    options = dict(method=method, lsa=lsa, indexer=indexer, cuda_graph=cuda_graph)
    extra = {}
    if len(questions) == 1 and kv_cache is None:
        prompt = build_prompt(context, questions[0])
        results = [generate(model, tokenizer, prompt, max_new_tokens=max_new_tokens, **options)]
    else:
        session = Session(model, tokenizer, context, kv_cache=kv_cache, **options)
        results = [session.ask(q, max_new_tokens=max_new_tokens) for q in questions]
        if session.saved_context is not None:
            extra = {"context_kv": session.saved_context}
    return [
        {"question": q, **stats_record(r.text.strip(), r.stats), **extra}
        for q, r in zip(questions, results, strict=True)
    ]
