"""A background response (Responses API, `background: true`): the server generates it on its
own; the client follows its events, goes away after a few, comes back and picks them up by
sequence number; a second one is cancelled. `pip install openai`, start `mlxserve serve`,
run this."""
import os

from openai import OpenAI

client = OpenAI(base_url=os.environ.get("MLXSERVE_URL", "http://127.0.0.1:8000/v1"),
                api_key=os.environ.get("MLXSERVE_API_KEY", "unused"))
model = os.environ.get("MLXSERVE_MODEL", "smollm2-135m")

response = client.responses.create(model=model, input="Write a short poem about the sea.",
                                   max_output_tokens=60, background=True)
print(f"[{response.id}: {response.status}]")

last = None
with client.responses.retrieve(response.id, stream=True) as events:
    for event in events:
        last = event.sequence_number
        if event.type == "response.output_text.delta":
            print(event.delta, end="", flush=True)
            break  # leave after the first piece of text: the server goes on without us

print(f"\n[left after event {last}; coming back]")
for event in client.responses.retrieve(response.id, stream=True, starting_after=last):
    if event.type == "response.output_text.delta":
        print(event.delta, end="", flush=True)
print()
done = client.responses.retrieve(response.id)
print(f"[{done.status}, {done.usage.output_tokens} tokens]")

other = client.responses.create(model=model, input="Count to a thousand.", max_output_tokens=500, background=True)
print(f"[cancelled: {client.responses.cancel(other.id).status}]")
