"""The HTTP server: one loaded model answering OpenAI-style completion requests and ``/v1/ask``, with LSA or full
attention per request, and each answer's KV accounting in the response."""

from __future__ import annotations

import asyncio
import json
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field, replace

import torch
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from torch import nn

from ..config import LSAConfig
from ..indexer.memory_indexer import MemoryIndexer
from ..runtime.ask import build_prompt, stats_record
from ..runtime.generate import decode_result, encode_prompts, generate_ids
from ..runtime.stats import GenerationStats
from .schemas import AskRequest, ChatRequest, CompletionRequest, LSAChoice


class ModelNotServed(ValueError):
    """A request named a model this server does not hold."""


@dataclass(slots=True)
class Answer:
    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str  # "stop" (end-of-text) or "length" (max tokens reached)
    stats: GenerationStats


@dataclass
class Engine:
    """One model with its tokenizer, the server's LSA settings and indexer.

    Requests run one at a time: they share one device, and an LSA cache already holds what a request may use of it.

    Args:
        model: causal LM, on its device.
        tokenizer: its tokenizer.
        name: the name requests may give in ``model``.
        lsa: LSA settings; a request may change only the budget. For DeepSeek-V4, settings in CSA entries
            (``flashmemory.deepseek_v4.cache.deepseek_v4_lsa_config``).
        indexer: the indexer LSA requests use, resolved once (None: zero-shot; for DeepSeek-V4 the native
            lightning indexers' query path).
        max_new_tokens: the most tokens one request may ask for. Default: 1024.
    """

    model: nn.Module
    tokenizer: object
    name: str
    lsa: LSAConfig = field(default_factory=LSAConfig)
    indexer: MemoryIndexer | None = None
    max_new_tokens: int = 1024
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, init=False)

    @property
    def is_deepseek_v4(self) -> bool:
        return getattr(self.model.config, "model_type", None) == "deepseek_v4"

    @property
    def window(self) -> int | None:
        return getattr(self.model.config, "max_position_embeddings", None)

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
        return self.lsa if choice.budget is None else replace(self.lsa, budget=choice.budget)  # validated by replace

    def answer(
        self,
        ids: torch.Tensor,
        choice: LSAChoice,
        max_new_tokens: int,
        on_token: Callable[[int], None] | None = None,
    ) -> Answer:
        """Greedy answer to one tokenised prompt; ``on_token`` sees each new token id as it is chosen."""
        lsa = self.settings(ids, choice, max_new_tokens)
        n = int(ids.shape[1])
        indexer = self.indexer if choice.method == "lsa" else None
        step = None if on_token is None else (lambda tok: on_token(int(tok[0])))
        if self.is_deepseek_v4:  # its own backend: LSA over the CSA entries, the native indexer's query path
            from ..deepseek_v4.generate import generate_ids as decode
        else:
            decode = generate_ids
        with self._lock:
            out, stats = decode(
                self.model,
                ids,
                method=choice.method,
                lsa=lsa,
                indexer=indexer,
                max_new_tokens=max_new_tokens,
                eos_token_id=self.tokenizer.eos_token_id,
                on_token=step,
            )
        result = decode_result(self.tokenizer, out, stats)
        generated = len(result.token_ids[0])
        # decode_result cuts at the first end-of-text token: fewer ids than decoded means the model stopped itself
        reason = "stop" if generated < out.shape[1] else "length"
        return Answer(result.text, n, generated, reason, stats)


class _Disconnected(Exception):
    """The client of a stream went away: decoding stops at the next token."""


def stream_answer(
    engine: Engine,
    ids: torch.Tensor,
    choice: LSAChoice,
    max_new_tokens: int,
    chunk: Callable[..., dict],
    request: Request | None = None,
) -> StreamingResponse:
    """The answer as server-sent events: ``chunk(text)`` for each new piece, ``chunk("", answer)`` last, then
    ``[DONE]``. Bad settings are refused before the stream starts, so they still get status 400. When the client
    goes away (``request`` reports it, or the stream is closed) decoding stops at its next token."""
    engine.settings(ids, choice, max_new_tokens)
    eos = engine.tokenizer.eos_token_id
    stops = set(eos if isinstance(eos, list) else [eos])
    gone = threading.Event()

    def sse(payload: dict | str) -> str:
        return f"data: {payload if isinstance(payload, str) else json.dumps(payload)}\n\n"

    async def body() -> AsyncIterator[str]:
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()

        def on_token(tok: int) -> None:
            if gone.is_set():
                raise _Disconnected
            loop.call_soon_threadsafe(events.put_nowait, tok)

        def work() -> None:
            try:
                result: object = engine.answer(ids, choice, max_new_tokens, on_token=on_token)
            except BaseException as exc:  # handed to the stream, which reports it; nothing else would see it
                result = exc
            if not gone.is_set():
                loop.call_soon_threadsafe(events.put_nowait, result)

        threading.Thread(target=work, daemon=True).start()
        produced: list[int] = []
        sent = ""
        ended = False
        try:
            while True:
                item = await events.get()
                if request is not None and await request.is_disconnected():
                    return
                if isinstance(item, Answer):
                    yield sse(chunk("", item))
                    yield sse("[DONE]")
                    return
                if isinstance(item, BaseException):
                    kind = "invalid_request_error" if isinstance(item, ValueError) else "server_error"
                    yield sse({"error": {"message": str(item), "type": kind}})
                    return
                ended = ended or item in stops
                if ended:
                    continue
                produced.append(item)
                text = engine.tokenizer.decode(produced, skip_special_tokens=True)
                if text.endswith("\ufffd"):  # a character split across tokens: wait for the rest of it
                    continue
                if len(text) > len(sent):
                    yield sse(chunk(text[len(sent) :]))
                    sent = text
        finally:
            gone.set()

    return StreamingResponse(body(), media_type="text/event-stream")


def _error(status: int, message: str, kind: str) -> JSONResponse:
    return JSONResponse(status_code=status, content={"error": {"message": message, "type": kind}})


def _describe(err: dict) -> str:
    where = ".".join(str(p) for p in err.get("loc", ()) if p != "body")
    message = str(err.get("msg", "invalid")).removeprefix("Value error, ")
    return f"{where}: {message}" if where else message


def _accounting(a: Answer) -> dict:
    total = a.prompt_tokens + a.completion_tokens
    usage = {"prompt_tokens": a.prompt_tokens, "completion_tokens": a.completion_tokens, "total_tokens": total}
    return {"usage": usage, "flashmemory": a.stats.to_dict()}


def create_app(engine: Engine) -> FastAPI:
    """The FastAPI application serving ``engine``: ``/health``, ``/v1/models``, ``/v1/completions``,
    ``/v1/chat/completions`` and ``/v1/ask``. Bad requests get status 400 (404 for another model's name) and one
    message in OpenAI's error shape."""
    from .. import __version__

    app = FastAPI(title="flashmemory", version=__version__)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        return _error(400, "; ".join(_describe(e) for e in exc.errors()), "invalid_request_error")

    @app.exception_handler(ModelNotServed)
    async def _unknown_model(request: Request, exc: ModelNotServed) -> JSONResponse:
        return _error(404, str(exc), "model_not_found")

    @app.exception_handler(ValueError)
    async def _bad_value(request: Request, exc: ValueError) -> JSONResponse:
        return _error(400, str(exc), "invalid_request_error")

    @app.get("/health")
    def health() -> dict:
        device = next(engine.model.parameters()).device
        return {
            "status": "ok",
            "model": engine.name,
            "device": str(device),
            "context_window": engine.window,
            "budget": engine.lsa.budget,
            "indexer": "zero-shot" if engine.indexer is None else "checkpoint",
            "max_new_tokens": engine.max_new_tokens,
        }

    @app.get("/v1/models")
    def models() -> dict:
        return {"object": "list", "data": [{"id": engine.name, "object": "model", "owned_by": "flashmemory"}]}

    @app.post("/v1/completions")
    def completions(req: CompletionRequest, request: Request) -> dict:
        engine.check_model(req.model)
        head = {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time())}
        head["model"] = engine.name

        def reply(text: str, a: Answer | None = None) -> dict:
            choice = {"index": 0, "text": text, "finish_reason": a and a.finish_reason, "logprobs": None}
            return {**head, "choices": [choice]} | ({} if a is None else _accounting(a))

        ids = engine.text_ids(req.prompt)
        if req.stream:
            return stream_answer(engine, ids, req, req.new_tokens, reply, request)
        a = engine.answer(ids, req, req.new_tokens)
        return reply(a.text, a)

    @app.post("/v1/chat/completions")
    def chat(req: ChatRequest, request: Request) -> dict:
        engine.check_model(req.model)
        if not any(m.content.strip() for m in req.messages):
            raise ValueError("messages: every message is empty")
        ids = engine.chat_ids([m.model_dump() for m in req.messages])
        head = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": engine.name}
        if req.stream:
            first = [True]

            def piece(text: str, a: Answer | None = None) -> dict:
                delta = {"role": "assistant", "content": text} if first[0] else ({"content": text} if text else {})
                first[0] = False
                choice = {"index": 0, "delta": delta, "finish_reason": a and a.finish_reason}
                out = {**head, "object": "chat.completion.chunk", "choices": [choice]}
                return out | ({} if a is None else _accounting(a))

            return stream_answer(engine, ids, req, req.new_tokens, piece, request)
        a = engine.answer(ids, req, req.new_tokens)
        message = {"role": "assistant", "content": a.text}
        choice = {"index": 0, "message": message, "finish_reason": a.finish_reason}
        return {**head, "object": "chat.completion", "choices": [choice]} | _accounting(a)

    @app.post("/v1/ask")
    def ask(req: AskRequest) -> dict:
        if not req.context.strip():
            raise ValueError("context: the context is empty")
        if not req.question.strip():
            raise ValueError("question: the question is empty")
        # tokenised exactly as ``flashmemory ask`` does, so both give the same answer
        ids = encode_prompts(engine.tokenizer, [build_prompt(req.context, req.question)], chat=True)["input_ids"]
        a = engine.answer(ids, req, req.max_new_tokens or min(64, engine.max_new_tokens))
        return stats_record(a.text.strip(), a.stats)

    return app
