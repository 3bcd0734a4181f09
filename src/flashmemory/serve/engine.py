"""The model behind the server: requests are checked, then decoded together when they arrive together.

LSA's device reserve is a fixed share of each sequence's cache, so a device holds several times more long
sequences with LSA than with full attention. With ``max_batch`` above 1, requests that arrive within ``batch_wait``
seconds of each other, with the same method and settings, are decoded as one left-padded batch, each sequence with
its own resident pages. The reserve is planned for the batch's longest prompt, so a shorter prompt gets at least the
page slots it would get alone, and its answer can differ from the one it gets alone; the accounting is the batch's.
With every page resident the answers are the same. One at a time (``max_batch`` 1) is the default.
"""

from __future__ import annotations

import queue
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from torch import nn

from ..config import LSAConfig
from ..indexer.memory_indexer import MemoryIndexer
from ..memory.pinned import HOST_POOL
from ..runtime.ask import AnsweringSession, falls_back, with_fallback
from ..runtime.generate import decode_result, generate_ids
from ..runtime.graph_step import choose_graph_replay
from ..runtime.sampling import Sampling, StopText
from ..runtime.session import Session, question_ids
from ..runtime.stats import GenerationStats
from .schemas import LSAChoice


class ModelNotServed(ValueError):
    """A request named a model this server does not hold."""


class ClientGone(Exception):
    """Raised by a token callback whose client went away: that sequence's decoding is no longer wanted."""


@dataclass(slots=True)
class Answer:
    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str  # "stop" (end-of-text or a stop string) or "length" (max tokens reached)
    stats: GenerationStats  # of the batch the request was decoded in (``stats.batch_size`` sequences)


@dataclass(slots=True)
class _Job:
    ids: torch.Tensor  # [1, T]
    method: str
    lsa: LSAConfig
    max_new_tokens: int
    on_token: Callable[[int], None] | None
    sampling: Sampling = field(default_factory=Sampling)
    stop: list[str] = field(default_factory=list)  # strings that end the answer (before them)
    own_budget: bool = False  # the request gave its budget (held to), rather than taking the server's
    result: Future = field(default_factory=Future)
    gone: bool = False  # its client left
    ended: bool = False  # its answer reached end-of-text or a stop string


@dataclass(slots=True)
class _SessionJob:
    """Several questions about one context: one :class:`Session`, decoded alone."""

    context: str
    questions: list[str]
    prompts: list[torch.Tensor]  # each question's prompt ids [1, T], as checked
    method: str
    lsa: LSAConfig
    max_new_tokens: int
    own_budget: bool = False
    result: Future = field(default_factory=Future)


@dataclass
class Engine:
    """One model with its tokenizer, the server's LSA settings and indexer, and the queue of its requests.

    Args:
        model: causal LM, on its device.
        tokenizer: its tokenizer.
        name: the name requests may give in ``model``.
        lsa: LSA settings; a request may change only the budget. For DeepSeek-V4, settings in CSA entries
            (``flashmemory.deepseek_v4.cache.deepseek_v4_lsa_config``).
        indexer: the indexer LSA requests use, resolved once (None: zero-shot; for DeepSeek-V4 the native
            lightning indexers' query path).
        max_new_tokens: the most tokens one request may ask for. Default: 1024.
        max_batch: the most requests decoded together; 1 decodes one at a time. Default: 1.
        batch_wait: seconds a batch waits for more requests after its first arrives. Default: 0.005.
        kv_cache: a folder of saved contexts for requests with several questions (see :class:`Session`); None
            saves nothing. Default: None.
        host_cache_bytes: page-locked host memory kept for later requests' KV mirrors after each request, at
            most; the rest is unlocked. None keeps all of it (the fastest for requests of recurring lengths).
            Default: None.
        cuda_graph: replay LSA decode steps between boundaries from a captured CUDA graph (see
            :func:`~flashmemory.runtime.generate.generate_ids`): True requires it (checked against the model when
            the engine is made), False decodes eagerly, None replays whenever the model and device allow
            (:func:`~flashmemory.runtime.graph_step.choose_graph_replay`); the engine holds the choice made.
            Full-attention requests decode eagerly. Default: None.
    """

    model: nn.Module
    tokenizer: object
    name: str
    lsa: LSAConfig = field(default_factory=LSAConfig)
    indexer: MemoryIndexer | None = None
    max_new_tokens: int = 1024
    max_batch: int = 1
    batch_wait: float = 0.005
    kv_cache: Path | None = None
    host_cache_bytes: int | None = None
    cuda_graph: bool | None = None
    _jobs: queue.Queue = field(default_factory=queue.Queue, repr=False, init=False)
    _worker: threading.Thread | None = field(default=None, repr=False, init=False)
    _start: threading.Lock = field(default_factory=threading.Lock, repr=False, init=False)
    _busy: threading.Event = field(default_factory=threading.Event, repr=False, init=False)

    def __post_init__(self) -> None:
        if self.max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {self.max_batch}")
        if self.batch_wait < 0:
            raise ValueError(f"batch_wait must be >= 0, got {self.batch_wait}")
        # chosen (or refused) now, not at the first request
        self.cuda_graph = choose_graph_replay(self.model, self.lsa, self.cuda_graph, self.indexer)

    @property
    def is_deepseek_v4(self) -> bool:
        return getattr(self.model.config, "model_type", None) == "deepseek_v4"

    @property
    def window(self) -> int | None:
        return getattr(self.model.config, "max_position_embeddings", None)

    @property
    def busy(self) -> bool:
        """Whether a batch is being decoded now."""
        return self._busy.is_set()

    def text_ids(self, text: str) -> torch.Tensor:
        """A raw prompt, tokenised as the model's own text (its special tokens included). # [1, T]"""
        return self.tokenizer(text, return_tensors="pt", add_special_tokens=True)["input_ids"]

    def chat_ids(self, messages: list[dict[str, str]]) -> torch.Tensor:
        """Messages rendered with the chat template, or as a plain transcript for a model without one. # [1, T]"""
        if getattr(self.tokenizer, "chat_template", None):
            text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            return self.tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"]
        return self.text_ids("".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant:")

    def check_model(self, requested: str | None) -> None:
        if requested not in (None, self.name):
            raise ModelNotServed(f"model {requested!r} is not served here; this server serves {self.name!r}")

    def settings(self, ids: torch.Tensor, choice: LSAChoice, max_new_tokens: int) -> LSAConfig:
        """The LSA settings of one request, refusing what the model or the settings cannot take."""
        if max_new_tokens > self.max_new_tokens:
            raise ValueError(f"at most {self.max_new_tokens} new tokens per request, asked for {max_new_tokens}")
        n = int(ids.shape[1])
        if self.window is not None and n + max_new_tokens > self.window:
            raise ValueError(
                f"the prompt is {n} tokens and {max_new_tokens} more were asked for, but the model handles at most "
                f"{self.window} tokens; shorten the prompt or ask for fewer tokens"
            )
        return self.request_lsa(choice)

    def request_lsa(self, choice: LSAChoice) -> LSAConfig:
        """The server's LSA settings with the request's budget, if it gives one (validated by ``replace``)."""
        return self.lsa if choice.budget is None else replace(self.lsa, budget=choice.budget)

    def answer(
        self,
        ids: torch.Tensor,
        choice: LSAChoice,
        max_new_tokens: int,
        on_token: Callable[[int], None] | None = None,
        *,
        sampling: Sampling | None = None,
        stop: list[str] | None = None,
    ) -> Answer:
        """The answer to one tokenised prompt, decoded with the requests that arrive with it.

        ``sampling`` chooses the tokens (greedy by default); the answer ends before the first of ``stop`` its text
        reaches. ``on_token`` sees each token id of the answer as it is chosen (through the one that completes a
        stop string; not the end-of-text token, nor anything after either); raising :class:`ClientGone` drops the
        request (its batch goes on for the others, and stops when none is left).
        """
        job = _Job(
            ids,
            choice.method,
            self.settings(ids, choice, max_new_tokens),
            max_new_tokens,
            on_token,
            sampling or Sampling(),
            list(stop or []),
            own_budget=choice.budget is not None,
        )
        self._submit(job)
        return job.result.result()

    def answer_questions(
        self,
        context: str,
        questions: list[str],
        choice: LSAChoice,
        max_new_tokens: int,
        prompts: list[torch.Tensor] | None = None,
    ) -> tuple[list[Answer], dict | None]:
        """Greedy answers to several questions about ``context``, from one prefill of it (a :class:`Session`).

        Each answer is the one :meth:`answer` gives for that question's prompt alone (decoded by itself). The
        caller checks every question's prompt with :meth:`settings` first and may hand the prompts it checked
        (:func:`~flashmemory.runtime.session.question_ids`) on in ``prompts``, so that the context is not tokenised
        again; the session is decoded with no other request, in the decode thread. Also returns, with
        :attr:`kv_cache`, the context's folder and whether it was read from there (else None).
        """
        if prompts is None:
            prompts = [question_ids(self.tokenizer, context, q) for q in questions]
        job = _SessionJob(
            context,
            list(questions),
            list(prompts),
            choice.method,
            self.request_lsa(choice),
            max_new_tokens,
            own_budget=choice.budget is not None,
        )
        self._submit(job)
        return job.result.result()

    def _submit(self, job: _Job | _SessionJob) -> None:
        with self._start:
            if self._worker is None:
                self._worker = threading.Thread(target=self._serve, name="flashmemory-decode", daemon=True)
                self._worker.start()
        self._jobs.put(job)

    # --- the decode thread ---------------------------------------------------------------------------------------

    def _fits(self, first: _Job | _SessionJob, job: _Job | _SessionJob) -> bool:
        if isinstance(first, _SessionJob) or isinstance(job, _SessionJob):
            return False  # a session owns its prefix and its caches: it decodes alone
        # one cache config and one sampler per batch (a seeded request is decoded alone: others would take draws
        # from its generator); DeepSeek-V4's compressors cannot skip padding, so its batches share a length
        if first.sampling.seed is not None or job.sampling.seed is not None:
            return False
        same = (job.method, job.lsa, job.sampling, job.own_budget) == (
            first.method,
            first.lsa,
            first.sampling,
            first.own_budget,
        )
        return same and (not self.is_deepseek_v4 or job.ids.shape[1] == first.ids.shape[1])

    def _serve(self) -> None:
        waiting: deque[_Job] = deque()
        while True:
            first = waiting.popleft() if waiting else self._jobs.get()
            batch = [first]
            for job in list(waiting):  # earlier arrivals first
                if len(batch) < self.max_batch and self._fits(first, job):
                    batch.append(job)
                    waiting.remove(job)
            deadline = time.monotonic() + self.batch_wait
            while len(batch) < self.max_batch and (left := deadline - time.monotonic()) > 0:
                try:
                    job = self._jobs.get(timeout=left)
                except queue.Empty:
                    break
                (batch if self._fits(first, job) else waiting).append(job)
            self._busy.set()
            try:
                if isinstance(first, _SessionJob):
                    self._run_session(first)
                else:
                    self._decode(batch)
            finally:
                self._trim_host_cache()
                self._busy.clear()

    def _trim_host_cache(self) -> None:
        if self.host_cache_bytes is None:
            return
        # a finished request's cache has given its mirror's block back already: caches hold no reference cycles
        HOST_POOL.trim(self.host_cache_bytes)

    def _run_session(self, job: _SessionJob) -> None:
        try:
            answering = AnsweringSession(
                lambda method: self._session(job, method),
                job.method,
                fall_back=falls_back(job.method, job.lsa, budget_given=job.own_budget),
            )
            answers = []
            for q, ids in zip(job.questions, job.prompts, strict=True):
                r = answering.ask(q, ids, job.max_new_tokens)
                tokens = r.token_ids[0]
                reason = "stop" if len(tokens) < job.max_new_tokens else "length"
                answers.append(Answer(r.text, r.stats.context_tokens, len(tokens), reason, r.stats))
        except BaseException as exc:  # the request hears of it; the thread serves the next one
            job.result.set_exception(exc)
            return
        job.result.set_result((answers, answering.session.saved_context))

    def _session(self, job: _SessionJob, method: str) -> Session:
        return Session(
            self.model,
            self.tokenizer,
            job.context,
            method=method,
            lsa=job.lsa,
            indexer=self.indexer if method == "lsa" else None,
            kv_cache=self.kv_cache,
            cuda_graph=self.cuda_graph and method == "lsa",
        )

    def _decode(self, batch: list[_Job]) -> None:
        eos = self.tokenizer.eos_token_id
        stops = set(eos if isinstance(eos, list) else [eos])
        pad = getattr(self.tokenizer, "pad_token_id", None)
        pad = pad if pad is not None else (min(stops) if None not in stops else 0)
        width = max(job.ids.shape[1] for job in batch)
        ids = torch.full((len(batch), width), pad, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for b, job in enumerate(batch):
            ids[b, width - job.ids.shape[1] :] = job.ids[0]
            mask[b, width - job.ids.shape[1] :] = 1
        steps = [0]
        stop = StopText(self.tokenizer, [job.stop for job in batch]) if any(job.stop for job in batch) else None

        def on_token(tok: torch.Tensor) -> None:
            steps[0] += 1
            for b, job in enumerate(batch):
                if stop is not None and stop.ended_at[b] is not None:
                    job.ended = True  # the token that completed its stop string went out last step
                if job.gone or job.ended or job.on_token is None or steps[0] > job.max_new_tokens:
                    continue
                token = int(tok[b])
                job.ended = token in stops
                try:
                    if not job.ended:
                        job.on_token(token)
                except ClientGone:
                    job.gone = True
            if all(job.gone for job in batch):
                raise ClientGone

        first = batch[0]

        def run(method: str):
            steps[0] = 0  # a run refused for its budget was refused at the prefill, before any token went out
            common = dict(
                method=method,
                lsa=first.lsa,
                indexer=self.indexer if method == "lsa" else None,
                max_new_tokens=max(job.max_new_tokens for job in batch),
                eos_token_id=eos,
                on_token=on_token,
                sampling=first.sampling,
                stop=stop,
            )
            if self.is_deepseek_v4:  # its own backend: LSA over the CSA entries, the native indexer's query path
                from ..deepseek_v4.generate import generate_ids as v4_generate_ids

                return v4_generate_ids(self.model, ids, **common)
            return generate_ids(self.model, ids, mask, cuda_graph=self.cuda_graph and method == "lsa", **common)

        try:
            fall_back = falls_back(first.method, first.lsa, budget_given=first.own_budget)
            out, stats = with_fallback(run, first.method, fall_back)
        except BaseException as exc:  # every request of the batch hears of it; the thread serves the next one
            for job in batch:
                job.result.set_exception(exc)
            return
        for b, job in enumerate(batch):
            row = out[b : b + 1, : job.max_new_tokens]
            result = decode_result(self.tokenizer, row, stats)  # cut at the first end-of-text token
            tokens, text, stopped = result.token_ids[0], result.text, False
            if stop is not None:
                tokens, text, stopped = stop.cut(b, tokens, text)
            reason = "stop" if stopped or len(tokens) < row.shape[1] else "length"
            job.result.set_result(Answer(text, int(job.ids.shape[1]), len(tokens), reason, stats))
