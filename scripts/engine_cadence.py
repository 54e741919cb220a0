"""One stream's decode cadence three ways, on random weights at a real shape: the bare
scheduler loop (ms per step, as scripts/profile_step.py), and the Engine's inter-token
latency (p50 of its events' timestamps) with the request consumed from a thread and from an
asyncio loop (as the bench and the HTTP server consume it). If the engine's figure is far
from the bare loop's, the engine costs steps; if all three move together between runs, the
host is what changed.

    PYTHONPATH=src python3 scripts/engine_cadence.py qwen3.5-0.8b [qwen3-0.6b ...]
"""

import asyncio
import statistics
import sys
import time

import mlx.core as mx

from mlxserve.engine import Engine, EngineConfig
from mlxserve.random_weights import build_random_model
from mlxserve.sampling import SamplingParams
from mlxserve.scheduler import Request
from steady_decode import decoding_scheduler

TOKENS = 200


def request(vocab: int) -> Request:
    prompt = mx.random.randint(0, vocab, (512,)).tolist()
    return Request(prompt, SamplingParams(max_tokens=TOKENS, temperature=0.0, ignore_eos=True))


def itl_ms(times: list[float]) -> float:
    return 1e3 * statistics.median(b - a for a, b in zip(times, times[1:]))


def main() -> None:
    for shape in sys.argv[1:]:
        loaded = build_random_model(shape)
        vocab = loaded.config["vocab_size"]
        scheduler = decoding_scheduler(loaded, 1, max_tokens=TOKENS + 100, warm_steps=30)
        start = time.perf_counter()
        for _ in range(100):
            scheduler.step()
        bare = 1e3 * (time.perf_counter() - start) / 100
        del scheduler
        figures = []
        with Engine(loaded, EngineConfig()) as engine:
            for consumer in ("thread", "asyncio", "thread", "asyncio"):
                if consumer == "thread":
                    times = [e.time for e in engine.submit(request(vocab)) if e.token_ids]
                else:
                    async def consume():
                        stream = engine.submit(request(vocab), asyncio.get_running_loop())
                        return [e.time async for e in stream if e.token_ids]
                    times = asyncio.run(consume())
                figures.append(f"{consumer} {itl_ms(times):.2f}")
        print(f"{shape}: bare loop {bare:.2f} ms/step; engine ITL p50 (ms): {', '.join(figures)}")


if __name__ == "__main__":
    main()
