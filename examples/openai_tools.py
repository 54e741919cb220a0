"""Tool calling with the openai SDK: the first request requires one tool call (tool_choice
"required", parallel_tool_calls false: the server holds the answer to a call of the tool, with
arguments valid under its schema, so even a model too small to follow the tool format makes
one); this script runs the tool and sends the result back for the final answer, where the
model may answer in text. Without MLXSERVE_MODEL it asks the server's model."""
import json
import os

from openai import OpenAI

client = OpenAI(base_url=os.environ.get("MLXSERVE_URL", "http://127.0.0.1:8000/v1"),
                api_key=os.environ.get("MLXSERVE_API_KEY", "unused"))
MODEL = os.environ.get("MLXSERVE_MODEL") or client.models.list().data[0].id
TOOLS = [{
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 60}},
                       "required": ["city"], "additionalProperties": False},
    },
}]


def get_weather(city: str) -> str:
    return f"It is sunny and 21 °C in {city}."


messages = [{"role": "user", "content": "What's the weather in Paris?"}]
# One call (parallel_tool_calls false): one question, one tool.
reply = client.chat.completions.create(model=MODEL, messages=messages, tools=TOOLS, tool_choice="required",
                                       parallel_tool_calls=False, max_tokens=128)
message = reply.choices[0].message
if reply.choices[0].finish_reason != "tool_calls":  # cut by max_tokens: its call may be incomplete
    raise SystemExit(f"the call did not finish ({reply.choices[0].finish_reason}): {message.tool_calls}")
messages.append({"role": "assistant", "content": message.content,
                 "tool_calls": [call.model_dump() for call in message.tool_calls]})
for call in message.tool_calls:
    args = json.loads(call.function.arguments)
    print(f"tool call: {call.function.name}({args})")
    messages.append({"role": "tool", "tool_call_id": call.id, "content": get_weather(**args)})
final = client.chat.completions.create(model=MODEL, messages=messages, tools=TOOLS, max_tokens=128)
print(final.choices[0].message.content)
