"""Structured output: the answer is JSON of a schema, here a pydantic model that the openai
SDK's `parse` sends as `response_format` and reads back. `pip install openai`, start
`mlxserve serve`, run this."""
import os

from openai import OpenAI
from pydantic import BaseModel, Field

client = OpenAI(base_url=os.environ.get("MLXSERVE_URL", "http://127.0.0.1:8000/v1"),
                api_key=os.environ.get("MLXSERVE_API_KEY", "unused"))
model = os.environ.get("MLXSERVE_MODEL", "smollm2-135m")


class City(BaseModel):
    name: str = Field(max_length=40)
    country: str = Field(max_length=40)
    population: int = Field(ge=0, le=50_000_000)


reply = client.chat.completions.parse(
    model=model,
    messages=[{"role": "user", "content": "Tell me about the capital of France."}],
    response_format=City,
    max_tokens=200,
    temperature=0,
)
city = reply.choices[0].message.parsed
print(repr(city))
print(f"{city.name} ({city.country}): population {city.population:,}")
