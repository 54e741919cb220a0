"""One stream's decode cadence three ways, on random weights at a real shape: the bare
scheduler loop (ms per step, as scripts/profile_step.py), and the Engine's inter-token
latency (p50 of its events' timestamps) with the request consumed from a thread and from an
asyncio loop (as the bench and the HTTP server consume it). If the engine's figure is far
from the bare loop's, the engine costs steps; if all three move together between runs, the
host is what changed.

With --streams N (N > 1), N streams instead: the bare loop at N rows, then two waves of N
requests through one Engine, consumed from an asyncio loop; each wave's ITL p50 is printed
(past each stream's 20th token). The second wave's rows start where the first wave's ended
and the prefix cache keeps those slots, so they decode in slots with gaps between them (see
batch.DECODE_SPAN_MAX_RATIO).

    PYTHONPATH=src:scripts python3 scripts/engine_cadence.py qwen3.5-0.8b [qwen3-0.6b ...] [--streams N]
"""

import argparse
import asyncio
import statistics
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


def one_stream(shape: str) -> None:
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


def many_streams(shape: str, streams: int) -> None:
    loaded = build_random_model(shape)
    vocab = loaded.config["vocab_size"]
    scheduler = decoding_scheduler(loaded, streams, max_tokens=TOKENS + 100, warm_steps=10)
    start = time.perf_counter()
    for _ in range(60):
        scheduler.step()
    bare = 1e3 * (time.perf_counter() - start) / 60
    del scheduler
    figures = []
    with Engine(loaded, EngineConfig()) as engine:
        for _ in range(2):
            async def wave():
                loop = asyncio.get_running_loop()
                submitted = [engine.submit(request(vocab), loop) for _ in range(streams)]

                async def consume(stream):
                    return [e.time async for e in stream if e.token_ids]
                return await asyncio.gather(*(consume(s) for s in submitted))
            gaps = [b - a for times in asyncio.run(wave()) for a, b in zip(times[20:], times[21:])]
            figures.append(f"{1e3 * statistics.median(gaps):.2f}")
    print(f"{shape}, {streams} streams: bare loop {bare:.2f} ms/step; engine ITL p50 (ms), "
          f"first wave then second: {', '.join(figures)}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("shapes", nargs="+", help="random-weights shapes, e.g. qwen3-0.6b")
    parser.add_argument("--streams", type=int, default=1)
    args = parser.parse_args()
    for shape in args.shapes:
        if args.streams > 1:
            many_streams(shape, args.streams)
        else:
            one_stream(shape)


if __name__ == "__main__":
    main()
