"""A scheduler whose rows all decode, in the steady state the profiling scripts measure
(imported by them; run them from the repository root with PYTHONPATH=src)."""

import mlx.core as mx

from mlxserve.engine import EngineConfig, make_scheduler
from mlxserve.sampling import SamplingParams
from mlxserve.scheduler import Request, Scheduler


def decoding_scheduler(loaded, streams: int, max_tokens: int, warm_steps: int) -> Scheduler:
    """`streams` greedy requests of 512 random prompt tokens, prefilled and past their first
    tokens, then `warm_steps` more steps; each may generate up to `max_tokens`."""
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    scheduler = make_scheduler(loaded, EngineConfig())
    for _ in range(streams):
        scheduler.add(Request(mx.random.randint(0, loaded.config["vocab_size"], (512,)).tolist(), params))
    while scheduler.waiting or not all(row.num_generated > 2 for row in scheduler.running):
        scheduler.step()
    for _ in range(warm_steps):
        scheduler.step()
    return scheduler
