#!/usr/bin/env bash
# Start the server, send the recorded requests and one streamed chat request, stop the server.
set -euo pipefail
cd "$(dirname "$0")"
flashmemory serve --port 8765 --device cpu --budget 0.2 > server_log.txt 2>&1 &
SERVER=$!
trap 'kill $SERVER' EXIT
for _ in $(seq 1 120); do curl -s localhost:8765/health > /dev/null && break; sleep 1; done
python requests.py > requests.txt
python - > /tmp/stream_body.json <<'PY'
import json
doc = open("../demo_ask_smollm2_cpu/demo_document.txt").read()
q = "\n\nAnswer from the text above. What is the access code of the library?"
print(json.dumps({"messages": [{"role": "user", "content": doc + q}], "max_tokens": 16, "stream": True}))
PY
{
  echo '$ curl -sN localhost:8765/v1/chat/completions -H "Content-Type: application/json" -d @body.json   # the demo document and question as one user message, "max_tokens": 16, "stream": true'
  curl -sN localhost:8765/v1/chat/completions -H "Content-Type: application/json" -d @/tmp/stream_body.json
} > stream.txt
