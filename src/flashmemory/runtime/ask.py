"""Questions about one long text file: the engine behind ``flashmemory ask``."""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

import torch

from ..config import LSAConfig
from ..memory.layout import BudgetError
from ..models import load_model
from .generate import METHODS, GenerationResult, encode_prompts, generate_encoded
from .graph_step import choose_graph_replay
from .sampling import TextStream
from .session import Session, question_ids
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
    """The text of a context file (``-``: standard input), refusing missing, unreadable and empty files."""
    if str(path) == "-":
        try:
            text = sys.stdin.buffer.read().decode("utf-8")
        except UnicodeDecodeError as exc:
            raise ValueError(f"the context on standard input is not UTF-8 text ({exc.reason})") from None
        if not text.strip():
            raise ValueError("the context on standard input is empty")
        return text
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
    return check_length(model, encode_prompts(tokenizer, [prompt], chat=True)["input_ids"], max_new_tokens)


def check_length(model, ids: torch.Tensor, max_new_tokens: int) -> int:
    """Tokens of the prompt ``ids [1, T]``; raises when they and the new tokens exceed the model's window."""
    n = int(ids.shape[1])
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


def check_options(method: str, max_new_tokens: int, cuda_graph: bool | None, device: str) -> None:
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
    cuda_graph: bool | None = None,
    kv_cache: str | Path | None = None,
    budget_given: bool | None = None,
    on_text: Callable[[int, str], None] | None = None,
) -> list[dict]:
    """Answer questions about the text in ``context_file``: one request for one question, one :class:`Session`
    (one prefill of the context) for several, or for any number with ``kv_cache`` (a folder the session reads the
    context's keys and values from, or saves them into).

    ``cuda_graph`` None replays LSA's decode steps from a CUDA graph whenever the model and device allow
    (:func:`~flashmemory.runtime.graph_step.choose_graph_replay`); True requires it, False decodes eagerly.
    A context too short for LSA's default budget is answered with full attention (:func:`falls_back`; the
    record's ``method`` says so); ``budget_given`` (default: whether ``lsa`` was given) holds LSA to its budget
    instead, refusing such a context.

    ``on_text(i, piece)`` sees the answer to question ``i`` as it is decoded, in pieces safe to show
    (:class:`~flashmemory.runtime.sampling.TextStream`); the records hold the whole answers.

    Returns one record per question: its ``question``, the ``answer`` and the accounting (with ``kv_cache``,
    also ``context_kv``: the folder and whether the context was read from it).
    """
    if not questions or any(not q.strip() for q in questions):
        raise ValueError("the question is empty" if len(questions) == 1 else "a question is empty")
    check_options(method, max_new_tokens, cuda_graph, device)
    context = read_context(context_file)
    model, tokenizer = load_on(model_name, device, progress=progress)
    # every question is checked before the context's prefill is spent; the ids checked are the ids answered
    prompts = [question_ids(tokenizer, context, q) for q in questions]
    for ids in prompts:
        check_length(model, ids, max_new_tokens)
    if budget_given is None:
        budget_given = lsa is not None
    lsa = lsa or LSAConfig()
    fallback = falls_back(method, lsa, budget_given=budget_given)
    cuda_graph = method == "lsa" and choose_graph_replay(model, lsa, cuda_graph)
    extra = {}
    shown = None if on_text is None else _Shown(tokenizer, len(questions), on_text)
    if len(questions) == 1 and kv_cache is None:

        def answer(how: str) -> GenerationResult:
            options = dict(method=how, lsa=lsa, indexer=indexer, cuda_graph=cuda_graph and how == "lsa")
            seen = None if shown is None else lambda tok: shown(0, tok)
            return generate_encoded(
                model, tokenizer, prompts[0], max_new_tokens=max_new_tokens, on_token=seen, **options
            )

        results = [_with_fallback(answer, method, fallback)]
    else:

        def session_for(how: str) -> Session:
            options = dict(method=how, lsa=lsa, indexer=indexer, cuda_graph=cuda_graph and how == "lsa")
            return Session(model, tokenizer, context, kv_cache=kv_cache, **options)

        results, session = session_answers(
            session_for, method, questions, prompts, max_new_tokens, fall_back=fallback, on_token=shown
        )
        if session.saved_context is not None:
            extra = {"context_kv": session.saved_context}
    if shown is not None:
        shown.finish([r.text for r in results])
    return [
        {"question": q, **stats_record(r.text.strip(), r.stats), **extra}
        for q, r in zip(questions, results, strict=True)
    ]


def falls_back(method: str, lsa: LSAConfig, *, budget_given: bool) -> bool:
    """Whether a prompt LSA refuses for its budget is answered with full attention instead.

    A default budget is a share of each prompt's full cache, chosen for long prompts; LSA's always-resident part
    (sink, recent tail, chunk keys) is about the same size at any length, so a short prompt outgrows the share
    (under about 950 tokens at budget 0.2 on SmolLM2-135M; ``flashmemory plan`` shows where). Its whole cache is
    small, and full attention serves it. A budget the caller gives is held to, and so is a budget in bytes (a
    byte cap that LSA cannot keep, full attention would not keep either): those refusals stand.
    """
    return method == "lsa" and not budget_given and lsa.budget is not None and lsa.budget <= 1.0


def _with_fallback(answer, method: str, fall_back: bool):
    """``answer(method)``, or ``answer("full")`` when LSA refuses the budget and ``fall_back`` allows it."""
    try:
        return answer(method)
    except BudgetError:
        if not (fall_back and method == "lsa"):
            raise
        return answer("full")


def session_answers(
    make_session: Callable[[str], Session],
    method: str,
    questions: list[str],
    prompts: list[torch.Tensor],
    max_new_tokens: int,
    *,
    fall_back: bool = False,
    on_token: Callable[[int, torch.Tensor], None] | None = None,
) -> tuple[list[GenerationResult], Session]:
    """Greedy answers to ``questions``, whose prompts (:func:`question_ids`) are ``prompts``, from one session
    (``make_session(method)``); returns them and the session. When LSA refuses a question for its budget and
    ``fall_back`` allows it (:func:`falls_back`), that question and the rest are answered by a full-attention
    session instead. ``on_token(i, tokens)`` sees question ``i``'s answer tokens as they are chosen."""
    session = make_session(method)
    results = []
    for i, (question, ids) in enumerate(zip(questions, prompts, strict=True)):
        seen = None if on_token is None else lambda tok, i=i: on_token(i, tok)

        def answer(how: str, question: str = question, ids: torch.Tensor = ids, seen=seen) -> GenerationResult:
            nonlocal session
            if session.method != how:
                session = make_session(how)
            return session.ask(question, max_new_tokens=max_new_tokens, prompt_ids=ids, on_token=seen)

        results.append(_with_fallback(answer, session.method, fall_back))
    return results, session


class _Shown:
    """Each question's answer tokens turned into text pieces for ``on_text(i, piece)``."""

    def __init__(self, tokenizer, questions: int, on_text: Callable[[int, str], None]) -> None:
        self.streams = [TextStream(tokenizer) for _ in range(questions)]
        self.on_text = on_text

    def __call__(self, i: int, tokens: torch.Tensor) -> None:
        if piece := self.streams[i].push(int(tokens[0])):
            self.on_text(i, piece)

    def finish(self, texts: list[str]) -> None:
        """Shows what the final answers add (text a character split across tokens held back at the end)."""
        for i, text in enumerate(texts):
            if rest := self.streams[i].finish(text):
                self.on_text(i, rest)
