"""The HTTP server: one loaded model answering OpenAI-style completion requests and ``/v1/ask``, with LSA or full
attention per request, and each answer's KV accounting in the response."""

from __future__ import annotations

import asyncio
import json
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable

import torch
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse

from ..memory.pinned import HOST_POOL
from ..runtime.ask import stats_record
from ..runtime.sampling import Sampling, TextStream
from ..runtime.session import question_ids
from .engine import Answer, ClientGone, Engine, ModelNotServed
from .schemas import AskRequest, ChatRequest, CompletionRequest, LSAChoice


def stream_answer(
    engine: Engine,
    ids: torch.Tensor,
    choice: LSAChoice,
    max_new_tokens: int,
    chunk: Callable[..., dict],
    request: Request | None = None,
    *,
    sampling: Sampling | None = None,
    stop: list[str] | None = None,
) -> StreamingResponse:
    """The answer as server-sent events: ``chunk(text)`` for each new piece, ``chunk("", answer)`` last, then
    ``[DONE]``. Bad settings are refused before the stream starts, so they still get status 400. When the client
    goes away (``request`` reports it, or the stream is closed) decoding stops at its next token. Text that could
    still begin one of the ``stop`` strings is held back until the next token tells, so no piece of a stop string
    is ever sent."""
    stop = list(stop or [])
    engine.settings(ids, choice, max_new_tokens)
    gone = threading.Event()

    def sse(payload: dict | str) -> str:
        return f"data: {payload if isinstance(payload, str) else json.dumps(payload)}\n\n"

    async def body() -> AsyncIterator[str]:
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()

        def on_token(tok: int) -> None:
            if gone.is_set():
                raise ClientGone
            loop.call_soon_threadsafe(events.put_nowait, tok)

        def work() -> None:
            try:
                result: object = engine.answer(
                    ids, choice, max_new_tokens, on_token=on_token, sampling=sampling, stop=stop
                )
            except BaseException as exc:  # handed to the stream, which reports it; nothing else would see it
                result = exc
            if not gone.is_set():
                loop.call_soon_threadsafe(events.put_nowait, result)

        threading.Thread(target=work, daemon=True).start()
        text = TextStream(engine.tokenizer, stop)
        try:
            while True:
                item = await events.get()
                if request is not None and await request.is_disconnected():
                    return
                if isinstance(item, Answer):
                    if rest := text.finish(item.text):  # what was held back and is not part of a stop string
                        yield sse(chunk(rest))
                    yield sse(chunk("", item))
                    yield sse("[DONE]")
                    return
                if isinstance(item, BaseException):
                    kind = "invalid_request_error" if isinstance(item, ValueError) else "server_error"
                    yield sse({"error": {"message": str(item), "type": kind}})
                    return
                if piece := text.push(item):
                    yield sse(chunk(piece))
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


def create_app(engine: Engine, *, api_key: str | None = None) -> FastAPI:
    """The FastAPI application serving ``engine``: ``/health``, ``/v1/models``, ``/v1/completions``,
    ``/v1/chat/completions`` and ``/v1/ask``. Bad requests get status 400 (404 for another model's name) and one
    message in OpenAI's error shape; a request whose KV history the host cannot hold gets 503. With ``api_key``,
    every ``/v1/`` request must send ``Authorization: Bearer <api_key>`` (401 otherwise); ``/health`` stays open
    for load balancers."""
    import secrets

    from .. import __version__

    app = FastAPI(title="flashmemory", version=__version__)

    if api_key is not None:
        if not api_key.strip():
            raise ValueError("the API key is empty")
        expected = f"Bearer {api_key}".encode()

        @app.middleware("http")
        async def _authorised(request: Request, call_next):
            if request.url.path.startswith("/v1/"):
                sent = request.headers.get("authorization", "").encode()
                if not secrets.compare_digest(sent, expected):
                    return _error(401, "missing or wrong API key (Authorization: Bearer ...)", "invalid_api_key")
            return await call_next(request)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        return _error(400, "; ".join(_describe(e) for e in exc.errors()), "invalid_request_error")

    @app.exception_handler(ModelNotServed)
    async def _unknown_model(request: Request, exc: ModelNotServed) -> JSONResponse:
        return _error(404, str(exc), "model_not_found")

    @app.exception_handler(ValueError)
    async def _bad_value(request: Request, exc: ValueError) -> JSONResponse:
        return _error(400, str(exc), "invalid_request_error")

    @app.exception_handler(MemoryError)
    async def _no_host_memory(request: Request, exc: MemoryError) -> JSONResponse:
        # the host could not hold this request's KV history now; a shorter one, or the same later, may fit
        return _error(503, str(exc), "server_overloaded")

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
            "max_batch": engine.max_batch,
            "cuda_graph": engine.cuda_graph,
            # page-locked host memory the KV mirrors hold, in use or kept for the next request (CUDA only)
            "host_locked_bytes": HOST_POOL.locked_bytes,
            "host_free_bytes": HOST_POOL.free_bytes,
        }

    @app.get("/v1/models")
    def models() -> dict:
        return {"object": "list", "data": [{"id": engine.name, "object": "model", "owned_by": "flashmemory"}]}

    @app.post("/v1/completions")
    def completions(req: CompletionRequest, request: Request) -> dict:
        engine.check_model(req.model)
        head = {
            "id": f"cmpl-{uuid.uuid4().hex}",
            "object": "text_completion",
            "created": int(time.time()),
            "model": engine.name,
        }

        def reply(text: str, a: Answer | None = None) -> dict:
            choice = {"index": 0, "text": text, "finish_reason": a and a.finish_reason, "logprobs": None}
            return {**head, "choices": [choice]} | ({} if a is None else _accounting(a))

        ids = engine.text_ids(req.prompt)
        decoding = dict(sampling=req.sampling, stop=req.stop_strings)
        if req.stream:
            return stream_answer(engine, ids, req, req.new_tokens, reply, request, **decoding)
        a = engine.answer(ids, req, req.new_tokens, **decoding)
        return reply(a.text, a)

    @app.post("/v1/chat/completions")
    def chat(req: ChatRequest, request: Request) -> dict:
        engine.check_model(req.model)
        if not any(m.content.strip() for m in req.messages):
            raise ValueError("messages: every message is empty")
        ids = engine.chat_ids([m.model_dump() for m in req.messages])
        head = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": engine.name}
        decoding = dict(sampling=req.sampling, stop=req.stop_strings)
        if req.stream:
            first = [True]

            def piece(text: str, a: Answer | None = None) -> dict:
                delta = {"role": "assistant", "content": text} if first[0] else ({"content": text} if text else {})
                first[0] = False
                choice = {"index": 0, "delta": delta, "finish_reason": a and a.finish_reason}
                out = {**head, "object": "chat.completion.chunk", "choices": [choice]}
                return out | ({} if a is None else _accounting(a))

            return stream_answer(engine, ids, req, req.new_tokens, piece, request, **decoding)
        a = engine.answer(ids, req, req.new_tokens, **decoding)
        message = {"role": "assistant", "content": a.text}
        choice = {"index": 0, "message": message, "finish_reason": a.finish_reason}
        return {**head, "object": "chat.completion", "choices": [choice]} | _accounting(a)

    @app.post("/v1/ask")
    def ask(req: AskRequest) -> dict:
        if not req.context.strip():
            raise ValueError("context: the context is empty")
        questions = [req.question] if req.questions is None else req.questions
        if any(not q.strip() for q in questions):
            raise ValueError("question: the question is empty" if req.questions is None else "questions: one is empty")
        max_new = req.max_new_tokens or min(64, engine.max_new_tokens)
        # tokenised exactly as ``flashmemory ask`` does, so both give the same answer; every question is checked
        # before a session spends the context's prefill
        prompts = [question_ids(engine.tokenizer, req.context, q) for q in questions]
        for ids in prompts:
            engine.settings(ids, req, max_new)
        if req.questions is None and engine.kv_cache is None:
            a = engine.answer(prompts[0], req, max_new)
            return stats_record(a.text.strip(), a.stats)
        # several questions, or a server that saves contexts: one session over the context, which is not
        # tokenised again
        answers, kv = engine.answer_questions(req.context, questions, req, max_new, prompts)
        extra = {} if kv is None else {"context_kv": kv}
        if req.questions is None:
            return stats_record(answers[0].text.strip(), answers[0].stats) | extra
        records = [
            {"question": q, **stats_record(a.text.strip(), a.stats)} for q, a in zip(questions, answers, strict=True)
        ]
        return {"answers": records} | extra

    return app
