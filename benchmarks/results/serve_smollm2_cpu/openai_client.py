"""The README's OpenAI-client example against `flashmemory serve --port 8767 --budget 0.2`, plain and streamed."""

from pathlib import Path

from openai import OpenAI

doc = (Path(__file__).parent / ".." / "demo_ask_smollm2_cpu" / "demo_document.txt").read_text()
prompt = doc + "\n\nAnswer from the text above. What is the access code of the library?"
client = OpenAI(base_url="http://localhost:8767/v1", api_key="unused")
reply = client.chat.completions.create(
    model="smollm2-135m",
    messages=[{"role": "user", "content": prompt}],
    max_tokens=16,
    extra_body={"method": "lsa", "budget": 0.15},
)
print("answer:", reply.choices[0].message.content, "| finish:", reply.choices[0].finish_reason)
print("usage:", reply.usage.prompt_tokens, reply.usage.completion_tokens)
print("device KV / full:", round(reply.model_extra["flashmemory"]["kv_ratio"], 4))
stream = client.chat.completions.create(
    model="smollm2-135m", messages=[{"role": "user", "content": prompt}], max_tokens=16, stream=True
)
pieces = [c.choices[0].delta.content or "" for c in stream if c.choices]
print("streamed:", "".join(pieces), f"({len(pieces)} chunks)")
try:
    client.chat.completions.create(model="smollm2-135m", messages=[{"role": "user", "content": "hi"}], temperature=0.7)
except Exception as exc:  # the client raises on status 400
    print("refused:", type(exc).__name__, exc)
