"""Send the recorded requests to a running `flashmemory serve --port 8765` (standard library only)."""

import json
import time
import urllib.error
import urllib.request
from pathlib import Path

BASE = "http://127.0.0.1:8765"
DOC = (Path(__file__).parent / ".." / "demo_ask_smollm2_cpu" / "demo_document.txt").read_text()
Q = "What is the access code of the library?"


def call(method: str, path: str, body: dict | None) -> tuple[int, dict]:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(BASE + path, data, {"Content-Type": "application/json"}, method=method)
    try:
        with urllib.request.urlopen(req) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


MOON = {
    "messages": [{"role": "user", "content": "Write three short facts about the moon, one per line."}],
    "max_tokens": 40,
}

CALLS = [
    ("GET", "/health", None),
    ("GET", "/v1/models", None),
    ("POST", "/v1/ask", {"context": DOC, "question": Q, "max_new_tokens": 16}),
    ("POST", "/v1/ask", {"context": DOC, "question": Q, "max_new_tokens": 16, "method": "full"}),
    (
        "POST",
        "/v1/chat/completions",
        {
            "model": "smollm2-135m",
            "messages": [{"role": "user", "content": DOC + "\n\nAnswer from the text above. " + Q}],
            "max_tokens": 16,
        },
    ),
    ("POST", "/v1/completions", {"prompt": "The capital of France is", "max_tokens": 8, "method": "full"}),
    ("POST", "/v1/ask", {"context": DOC, "question": " ", "max_new_tokens": 16}),
    ("POST", "/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "temperature": 3.0}),
    ("POST", "/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "n": 2}),
    *[("POST", "/v1/chat/completions", {**MOON, "temperature": 0.7, "top_p": 0.9, "seed": s}) for s in (1, 1, 2)],
    ("POST", "/v1/chat/completions", {**MOON, "stop": "\n"}),
    ("POST", "/v1/ask", {"context": DOC * 5, "question": Q}),
]

for method, path, body in CALLS:
    t = time.perf_counter()
    status, out = call(method, path, body)
    shown = {k: (v[:80] + "...") if isinstance(v, str) and len(v) > 80 else v for k, v in (body or {}).items()}
    if "messages" in shown:
        shown["messages"] = f"[1 user message, {len(body['messages'][0]['content'])} chars]"
    print(f"{method} {path} {json.dumps(shown)}")
    print(f"-> {status} in {time.perf_counter() - t:.2f} s: {json.dumps(out)}\n")
