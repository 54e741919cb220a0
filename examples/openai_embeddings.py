"""Embeddings through the official openai SDK: rank a few sentences by their closeness to a
question (cosine similarity of unit vectors: a dot product). `pip install openai`, start
`mlxserve serve`, run this."""
import os

from openai import OpenAI

client = OpenAI(base_url=os.environ.get("MLXSERVE_URL", "http://127.0.0.1:8000/v1"),
                api_key=os.environ.get("MLXSERVE_API_KEY", "unused"))
model = os.environ.get("MLXSERVE_MODEL", "smollm2-135m")

documents = ["Paris is the capital of France.",
             "The mitochondria is the powerhouse of the cell.",
             "Python is a programming language."]
question = "Which city is France's capital?"

reply = client.embeddings.create(model=model, input=[question, *documents])
query, *vectors = [item.embedding for item in reply.data]
scores = [sum(q * v for q, v in zip(query, vector)) for vector in vectors]
for score, document in sorted(zip(scores, documents), reverse=True):
    print(f"{score:+.3f}  {document}")
print(f"[{reply.usage.prompt_tokens} tokens, {len(query)} dimensions]")
