"""A three-turn conversation with the openai SDK, showing the prefix cache at work.

Each turn resends the whole conversation. mlxserve keeps a finished request's KV cache, so the
next turn's prompt, which starts with everything said so far, reuses it instead of recomputing
it: `usage.prompt_tokens_details.cached_tokens` says how many prompt tokens came from the cache
(from a turn's whole 64-token blocks on, to the token: everything up to the end of the previous
answer; a conversation shorter than one block has nothing kept yet, hence the long system
prompt).
"""
import os

from openai import OpenAI

client = OpenAI(base_url=os.environ.get("MLXSERVE_URL", "http://127.0.0.1:8000/v1"),
                api_key=os.environ.get("MLXSERVE_API_KEY", "unused"))
MODEL = os.environ.get("MLXSERVE_MODEL", "smollm2-135m")

SYSTEM = ("You are a patient tutor for a student learning about the solar system. Answer in two "
          "or three short sentences, in plain words, without lists or headings. When the student "
          "asks a follow-up question, connect your answer to what you said before, and say so "
          "honestly when something is not known.")
QUESTIONS = ["Why does Mars look red?",
             "Is there water there?",
             "Could people live there one day?"]

messages = [{"role": "system", "content": SYSTEM}]
for turn, question in enumerate(QUESTIONS, 1):
    messages.append({"role": "user", "content": question})
    reply = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=48,
                                           temperature=0)
    answer = reply.choices[0].message.content
    messages.append({"role": "assistant", "content": answer})
    usage = reply.usage
    details = usage.prompt_tokens_details
    cached = details.cached_tokens if details is not None else 0
    print(f"turn {turn}: {question}")
    print(f"  {answer.strip()}")
    print(f"  [prompt {usage.prompt_tokens} tokens, {cached} from the prefix cache; "
          f"{usage.completion_tokens} generated]")
