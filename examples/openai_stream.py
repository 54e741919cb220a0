"""Streaming with the openai SDK: tokens print as they arrive."""
import os

from openai import OpenAI

client = OpenAI(base_url=os.environ.get("MLXSERVE_URL", "http://127.0.0.1:8000/v1"),
                api_key=os.environ.get("MLXSERVE_API_KEY", "unused"))
stream = client.chat.completions.create(
    model=os.environ.get("MLXSERVE_MODEL", "smollm2-135m"),
    messages=[{"role": "user", "content": "Count from one to five in words."}],
    max_tokens=64,
    stream=True,
)
for chunk in stream:
    if chunk.choices and chunk.choices[0].delta.content:
        print(chunk.choices[0].delta.content, end="", flush=True)
print()
