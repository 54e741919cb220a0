"""OpenAI's Responses API: a streamed answer, then a follow-up that continues it by
`previous_response_id` (the server keeps the conversation). `pip install openai`, start
`mlxserve serve`, run this."""
import os

from openai import OpenAI

client = OpenAI(base_url=os.environ.get("MLXSERVE_URL", "http://127.0.0.1:8000/v1"),
                api_key=os.environ.get("MLXSERVE_API_KEY", "unused"))
model = os.environ.get("MLXSERVE_MODEL", "smollm2-135m")

stream = client.responses.create(model=model, instructions="Answer in one sentence.",
                                 input="Why is the sky blue?", max_output_tokens=80, stream=True)
first_id = None
for event in stream:
    if event.type == "response.output_text.delta":
        print(event.delta, end="", flush=True)
    elif event.type in ("response.completed", "response.incomplete"):
        first_id = event.response.id
print()

# instructions are not carried over: each request gives its own (the same here, so the
# follow-up's prompt starts as the first one did, and the prefix cache has that part).
follow_up = client.responses.create(model=model, instructions="Answer in one sentence.",
                                    previous_response_id=first_id, input="And at sunset?", max_output_tokens=80)
print(follow_up.output_text)
print(f"[{follow_up.usage.input_tokens} input tokens, "
      f"{follow_up.usage.input_tokens_details.cached_tokens} from the prefix cache]")
