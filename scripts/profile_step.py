"""Where a steady decode step's time goes: Python graph building (Runner.forward), MLX encoding
(mx.async_eval), waiting for the previous step (Scheduler._wait_for_device) and reading it back
(Scheduler._read_back), at 1 and 32 streams, on random weights at a real shape (see
mlxserve.random_weights.SHAPES).

    PYTHONPATH=src python3 scripts/profile_step.py qwen3.5-0.8b [--streams 1,32]
"""

import argparse
import time

import mlx.core as mx

from mlxserve import runner
from mlxserve.random_weights import build_random_model
from mlxserve.scheduler import Scheduler
from bench_variant import apply_tunings
from phases import SPENT, timed
from steady_decode import decoding_scheduler

apply_tunings()  # the tunings of scripts/bench_variant.py named by environment variables


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("shape", help="a random-weights shape, e.g. qwen3-0.6b or qwen3.5-0.8b")
    parser.add_argument("--quantize", type=int, choices=(4, 8), help="quantize the random weights to 4 or 8 bits")
    parser.add_argument("--streams", default="1,32", help="comma-separated numbers of decoding rows")
    parser.add_argument("--steps", type=int, default=60, help="steps measured per setting")
    args = parser.parse_args()
    runner.Runner.forward = timed("build graph", runner.Runner.forward)
    mx.async_eval = timed("encode (async_eval)", mx.async_eval)
    Scheduler._wait_for_device = timed("wait", Scheduler._wait_for_device)
    Scheduler._read_back = timed("read back", Scheduler._read_back)
    loaded = build_random_model(args.shape, quantize=args.quantize)
    for streams in (int(s) for s in args.streams.split(",")):
        scheduler = decoding_scheduler(loaded, streams, max_tokens=args.steps + 200, warm_steps=30)
        SPENT.clear()
        start = time.perf_counter()
        for _ in range(args.steps):
            scheduler.step()
        per_step = (time.perf_counter() - start) / args.steps
        parts = "  ".join(f"{name} {1e3 * s / args.steps:.2f}" for name, s in SPENT.items())
        print(f"{args.shape}{f' {args.quantize}-bit' if args.quantize else ''}, {streams} streams: {1e3 * per_step:.2f} ms/step | {parts} (ms)")


if __name__ == "__main__":
    main()
