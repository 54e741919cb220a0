"""Several requests at once with the async openai SDK: the server batches them together."""
import asyncio
import os

from openai import AsyncOpenAI

client = AsyncOpenAI(base_url=os.environ.get("MLXSERVE_URL", "http://127.0.0.1:8000/v1"),
                     api_key=os.environ.get("MLXSERVE_API_KEY", "unused"))
MODEL = os.environ.get("MLXSERVE_MODEL", "smollm2-135m")


async def ask(question: str) -> str:
    reply = await client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": question}], max_tokens=48)
    return reply.choices[0].message.content


async def main() -> None:
    questions = ["What is 2 + 2?", "Name a planet.", "What color is grass?", "Say hello in French."]
    for question, answer in zip(questions, await asyncio.gather(*(ask(q) for q in questions))):
        print(f"{question} -> {answer!r}")


asyncio.run(main())
