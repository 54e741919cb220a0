"""The official openai SDK against mlxserve: `pip install openai`, start `mlxserve serve`, run this."""
import os

from openai import OpenAI

client = OpenAI(base_url=os.environ.get("MLXSERVE_URL", "http://127.0.0.1:8000/v1"),
                api_key=os.environ.get("MLXSERVE_API_KEY", "unused"))
model = os.environ.get("MLXSERVE_MODEL", "smollm2-135m")

reply = client.chat.completions.create(
    model=model,
    messages=[{"role": "system", "content": "You are concise."},
              {"role": "user", "content": "Name three primary colors."}],
    max_tokens=64,
)
print(reply.choices[0].message.content)
print(f"[{reply.usage.prompt_tokens} prompt tokens, {reply.usage.completion_tokens} generated]")
