"""A streaming client that goes away stops the decoding: checked over a real socket with uvicorn."""

import socket
import threading
import time

import pytest

pytest.importorskip("fastapi", reason="pip install 'flashmemory[serve]'")
import httpx  # noqa: E402
import uvicorn  # noqa: E402

from flashmemory.models.tiny import tiny_model  # noqa: E402
from flashmemory.serve import Engine, create_app  # noqa: E402

from ..bench.fake_tokenizers import BatchCharTokenizer  # noqa: E402
from .test_app import CONTEXT, LSA  # noqa: E402


class SlowEngine(Engine):
    """Decodes a token every 50 ms, so that a run of 200 tokens outlasts the client by seconds."""

    decoded = 0

    def answer(self, ids, choice, max_new_tokens, on_token=None, **decoding):
        def slow(tok):
            SlowEngine.decoded += 1
            time.sleep(0.05)
            if on_token is not None:
                on_token(tok)

        return super().answer(ids, choice, max_new_tokens, on_token=slow, **decoding)


def test_a_client_that_leaves_a_stream_stops_the_decoding():
    engine = SlowEngine(tiny_model("llama"), BatchCharTokenizer(), "tiny", lsa=LSA, max_new_tokens=200)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(create_app(engine), port=port, log_level="warning"))
    threading.Thread(target=server.run, daemon=True).start()
    try:
        deadline = time.monotonic() + 20
        while not server.started and time.monotonic() < deadline:
            time.sleep(0.05)
        body = {"prompt": CONTEXT[:300], "max_tokens": 200, "stream": True}
        with httpx.Client(timeout=20) as client:
            with client.stream("POST", f"http://127.0.0.1:{port}/v1/completions", json=body) as response:
                first = next(line for line in response.iter_lines() if line.startswith("data:"))
        assert '"text"' in first
        deadline = time.monotonic() + 5
        while engine.busy and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not engine.busy, "decoding went on after the client left"
        assert SlowEngine.decoded < 50
    finally:
        server.should_exit = True
