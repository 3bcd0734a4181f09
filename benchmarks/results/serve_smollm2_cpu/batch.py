"""Four held-out planted facts (2K tokens, seeds 2000-2003) sent at once to `flashmemory serve --port PORT`."""

import json
import sys
import urllib.request
from concurrent.futures import ThreadPoolExecutor

from flashmemory import load_model
from flashmemory.bench.planted_fact import planted_fact

port = int(sys.argv[1])
_, tok = load_model("smollm2-135m", progress=False)
tasks = [planted_fact(tok, 2048, seed=s) for s in range(2000, 2004)]


def ask(task) -> dict:
    body = json.dumps({"context": task.document, "question": task.question, "max_new_tokens": 16}).encode()
    req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/ask", body, {"Content-Type": "application/json"})
    with urllib.request.urlopen(req) as r:
        return json.loads(r.read())


with ThreadPoolExecutor(len(tasks)) as pool:
    answers = list(pool.map(ask, tasks))
for task, a in zip(tasks, answers, strict=True):
    row = {k: a[k] for k in ("answer", "batch_size", "context_tokens", "kv_bytes_device", "kv_bytes_full", "kv_ratio")}
    print(json.dumps({"correct": task.is_correct(a["answer"]), **row}))
