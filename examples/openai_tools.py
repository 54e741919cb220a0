"""Tool calling with the openai SDK. A model that supports tools (Qwen2.5, Qwen3) answers with
`tool_calls`; this script runs the tool and sends the result back for the final answer. A model
too small to follow the tool format answers in text instead (Qwen2.5-Coder-0.5B writes the call
as a JSON code block), and the script says so. Without MLXSERVE_MODEL it asks the server's model."""
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
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}]


def get_weather(city: str) -> str:
    return f"It is sunny and 21 °C in {city}."


messages = [{"role": "user", "content": "What's the weather in Paris?"}]
reply = client.chat.completions.create(model=MODEL, messages=messages, tools=TOOLS, max_tokens=128)
message = reply.choices[0].message
if not message.tool_calls:
    print("the model answered without a tool:", message.content)
else:
    messages.append({"role": "assistant", "content": message.content,
                     "tool_calls": [call.model_dump() for call in message.tool_calls]})
    for call in message.tool_calls:
        args = json.loads(call.function.arguments)
        print(f"tool call: {call.function.name}({args})")
        messages.append({"role": "tool", "tool_call_id": call.id, "content": get_weather(**args)})
    final = client.chat.completions.create(model=MODEL, messages=messages, tools=TOOLS, max_tokens=128)
    print(final.choices[0].message.content)
