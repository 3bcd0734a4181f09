"""Questions about one long text file: the engine behind ``flashmemory ask``."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import TypeVar

import torch

from ..config import LSAConfig
from ..indexer.shipped import resolve_indexer
from ..memory.layout import BudgetError
from ..models import load_model
from .generate import METHODS, GenerationResult, generate_encoded
from .graph_step import choose_graph_replay
from .prefill_progress import PrefillProgress
from .sampling import TextStream
from .session import Session, question_ids
from .stats import GenerationStats

T = TypeVar("T")


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
    on_answer: Callable[[int, dict], None] | None = None,
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
    (:class:`~flashmemory.runtime.sampling.TextStream`); the records hold the whole answers. ``on_answer(i,
    record)`` sees each record as soon as its answer is whole, so that a failure at a later question loses none.

    Returns one record per question: its ``question``, the ``answer`` and the accounting (with ``kv_cache``,
    also ``context_kv``: the folder and whether the context was read from it).
    """
    if not questions or any(not q.strip() for q in questions):
        raise ValueError("the question is empty" if len(questions) == 1 else "a question is empty")
    setup = _Setup(
        model_name,
        context_file,
        method=method,
        lsa=lsa,
        max_new_tokens=max_new_tokens,
        device=device,
        progress=progress,
        indexer=indexer,
        cuda_graph=cuda_graph,
    )
    setup.budget_held(budget_given, lsa)
    # every question is checked before the context's prefill is spent; the ids checked are the ids answered
    prompts = [setup.prompt(q) for q in questions]
    shown = None if on_text is None else _Shown(setup.tokenizer, on_text)
    records: list[dict] = []

    def done(question: str, result: GenerationResult, extra: dict) -> None:
        i = len(records)
        if shown is not None:
            shown.finish_one(i, result.text)
        records.append({"question": question, **stats_record(result.text.strip(), result.stats), **extra})
        if on_answer is not None:
            on_answer(i, records[-1])

    with setup.prefill_bar():
        if len(questions) == 1 and kv_cache is None:
            done(questions[0], setup.answer_alone(prompts[0], shown and shown.for_question(0)), {})
        else:
            answering = AnsweringSession(setup.session_maker(kv_cache), method, fall_back=setup.fall_back)
            for i, (q, ids) in enumerate(zip(questions, prompts, strict=True)):
                result = answering.ask(q, ids, max_new_tokens, on_token=shown and shown.for_question(i))
                done(q, result, answering.context_kv())
    return records


def ask_as_they_come(
    model_name: str,
    context_file: str | Path,
    questions: Iterable[str],
    *,
    on_text: Callable[[int, str], None] | None = None,
    on_refused: Callable[[str, str], None] | None = None,
    kv_cache: str | Path | None = None,
    budget_given: bool | None = None,
    **options,
) -> Iterator[dict]:
    """Answer questions about the text in ``context_file`` as they come (typed at a prompt, or lines piped in),
    through one :class:`Session`: the context is prefilled before the first question is read, and each record is
    yielded as soon as its answer is whole. Blank questions are skipped. A question that cannot be answered (too
    long for the model's window, or refused by a budget given) goes to ``on_refused(question, message)`` and the
    next one is read; nothing computed is lost. The other options are :func:`ask_questions`'s; ``on_text(i,
    piece)`` counts the answered questions from 0.
    """
    setup = _Setup(model_name, context_file, **options)
    setup.budget_held(budget_given, options.get("lsa"))
    with setup.prefill_bar():
        yield from _answer_as_they_come(setup, questions, kv_cache, on_text, on_refused)


def _answer_as_they_come(
    setup: _Setup,
    questions: Iterable[str],
    kv_cache: str | Path | None,
    on_text: Callable[[int, str], None] | None,
    on_refused: Callable[[str, str], None] | None,
) -> Iterator[dict]:
    answering = AnsweringSession(setup.session_maker(kv_cache), setup.method, fall_back=setup.fall_back)
    shown = None if on_text is None else _Shown(setup.tokenizer, on_text)
    answered = 0
    for question in questions:
        if not question.strip():
            continue
        try:
            ids = setup.prompt(question)
            seen = None if shown is None else shown.for_question(answered)
            result = answering.ask(question, ids, setup.max_new_tokens, on_token=seen)
        except ValueError as exc:  # BudgetError is one
            if on_refused is None:
                raise
            on_refused(question, str(exc))
            continue
        if shown is not None:
            shown.finish_one(answered, result.text)
        answered += 1
        yield {"question": question, **stats_record(result.text.strip(), result.stats), **answering.context_kv()}


class _Setup:
    """What answering needs before any question: options checked, the context read, the model loaded, the LSA
    settings and graph replay chosen."""

    def __init__(
        self,
        model_name: str,
        context_file: str | Path,
        *,
        method: str = "lsa",
        lsa: LSAConfig | None = None,
        max_new_tokens: int = 64,
        device: str = "auto",
        progress: bool = True,
        indexer: str = "auto",
        cuda_graph: bool | None = None,
    ) -> None:
        check_options(method, max_new_tokens, cuda_graph, device)
        self.context = read_context(context_file)
        self.model, self.tokenizer = load_on(model_name, device, progress=progress)
        self.method, self.lsa, self.max_new_tokens = method, lsa or LSAConfig(), max_new_tokens
        # resolved once: every question's answer uses it, and whether graph replay can run may depend on it
        self.indexer = resolve_indexer(self.model, indexer) if method == "lsa" else None
        self.cuda_graph = method == "lsa" and choose_graph_replay(self.model, self.lsa, cuda_graph, self.indexer)
        self.fall_back = False
        self.progress = progress

    def prefill_bar(self) -> contextlib.AbstractContextManager:
        """A bar over the layers while a long context is prefilled, when ``progress`` is on."""
        return PrefillProgress(self.model) if self.progress else contextlib.nullcontext()

    def budget_held(self, budget_given: bool | None, lsa: LSAConfig | None) -> None:
        """Whether LSA holds to its budget (default: when ``lsa`` was given) or falls back (:func:`falls_back`)."""
        given = lsa is not None if budget_given is None else budget_given
        self.fall_back = falls_back(self.method, self.lsa, budget_given=given)

    def prompt(self, question: str) -> torch.Tensor:
        """The question's prompt ids, refused when it and the answer would not fit the model's window."""
        ids = question_ids(self.tokenizer, self.context, question)
        check_length(self.model, ids, self.max_new_tokens)
        return ids

    def options(self, how: str) -> dict:
        return dict(method=how, lsa=self.lsa, indexer=self.indexer, cuda_graph=self.cuda_graph and how == "lsa")

    def answer_alone(self, ids: torch.Tensor, on_token) -> GenerationResult:
        """One question as one request: no session, no host copy of the context kept."""

        def answer(how: str) -> GenerationResult:
            return generate_encoded(
                self.model,
                self.tokenizer,
                ids,
                max_new_tokens=self.max_new_tokens,
                on_token=on_token,
                **self.options(how),
            )

        return with_fallback(answer, self.method, self.fall_back)

    def session_maker(self, kv_cache: str | Path | None) -> Callable[[str], Session]:
        return lambda how: Session(self.model, self.tokenizer, self.context, kv_cache=kv_cache, **self.options(how))


def falls_back(method: str, lsa: LSAConfig, *, budget_given: bool) -> bool:
    """Whether a prompt LSA refuses for its budget is answered with full attention instead.

    A default budget is a share of each prompt's full cache, chosen for long prompts; LSA's always-resident part
    (sink, recent tail, chunk keys) is about the same size at any length, so a short prompt outgrows the share
    (under about 950 tokens at budget 0.2 on SmolLM2-135M; ``flashmemory plan`` shows where). Its whole cache is
    small, and full attention serves it. A budget the caller gives is held to, and so is a budget in bytes (a
    byte cap that LSA cannot keep, full attention would not keep either): those refusals stand.
    """
    return method == "lsa" and not budget_given and lsa.budget is not None and lsa.budget <= 1.0


def with_fallback(answer: Callable[[str], T], method: str, fall_back: bool) -> T:
    """``answer(method)``, or ``answer("full")`` when LSA refuses the budget and ``fall_back`` allows it
    (:func:`falls_back`); LSA refuses at the prefill, before any token is chosen."""
    try:
        return answer(method)
    except BudgetError:
        if not (fall_back and method == "lsa"):
            raise
        return answer("full")


class AnsweringSession:
    """Questions about one context answered one after another by a :class:`Session` (``make_session(method)``).
    When LSA refuses a question for its budget and ``fall_back`` allows it (:func:`falls_back`), that question and
    the rest are answered by a full-attention session instead."""

    def __init__(self, make_session: Callable[[str], Session], method: str, *, fall_back: bool = False) -> None:
        self._make, self.fall_back = make_session, fall_back
        self.session = make_session(method)

    def ask(
        self,
        question: str,
        ids: torch.Tensor,
        max_new_tokens: int,
        on_token: Callable[[torch.Tensor], None] | None = None,
    ) -> GenerationResult:
        """The greedy answer to ``question``, whose prompt (:func:`question_ids`) is ``ids``."""

        def answer(how: str) -> GenerationResult:
            if self.session.method != how:
                self.session = self._make(how)
            return self.session.ask(question, max_new_tokens=max_new_tokens, prompt_ids=ids, on_token=on_token)

        return with_fallback(answer, self.session.method, self.fall_back)

    def context_kv(self) -> dict:
        """``{"context_kv": ...}`` when the session saves contexts (:attr:`Session.saved_context`), else ``{}``."""
        saved = self.session.saved_context
        return {} if saved is None else {"context_kv": saved}


class _Shown:
    """Each question's answer tokens turned into text pieces for ``on_text(i, piece)``."""

    def __init__(self, tokenizer, on_text: Callable[[int, str], None]) -> None:
        self.tokenizer, self.on_text = tokenizer, on_text
        self.streams: dict[int, TextStream] = {}

    def for_question(self, i: int) -> Callable[[torch.Tensor], None]:
        """The ``on_token`` of question ``i``'s answer, with a text stream of its own."""
        self.streams[i] = stream = TextStream(self.tokenizer)

        def seen(tokens: torch.Tensor) -> None:
            if piece := stream.push(int(tokens[0])):
                self.on_text(i, piece)

        return seen

    def finish_one(self, i: int, text: str) -> None:
        """Shows what the final answer adds (text a character split across tokens held back at the end)."""
        if rest := self.streams[i].finish(text):
            self.on_text(i, rest)
