"""Per-step time of a closed-loop run, split into the host's part (building and encoding the
step, reading back the previous one) and the device's remainder (each step is synchronized),
for decode-only steps and for steps that also prefill; then the slowest steps with their
prefill chunk lengths. Random weights at a real shape (see mlxserve.random_weights.SHAPES).

    PYTHONPATH=src python3 scripts/profile_mixed_steps.py qwen3.5-0.8b [--streams 16]
        [--requests 24] [--prompt-tokens 512] [--gen-tokens 48]

Compare MLX_USE_CUDA_GRAPHS=1 (MLX's default) with mlxserve's 0 on a CUDA machine.
"""

import argparse
import os
import time

import mlx.core as mx

from mlxserve import runner
from mlxserve.engine import EngineConfig, make_scheduler
from mlxserve.random_weights import build_random_model
from mlxserve.sampling import SamplingParams
from mlxserve.scheduler import Request

STEP: dict = {}


def recording(forward):
    def wrapper(self, feeds, previous=None):
        STEP["decode"] = sum(1 for f in feeds if len(f.tokens) == 1)
        STEP["chunks"] = [len(f.tokens) for f in feeds if len(f.tokens) > 1]
        return forward(self, feeds, previous)
    return wrapper


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("shape")
    parser.add_argument("--streams", type=int, default=16)
    parser.add_argument("--requests", type=int, default=24)
    parser.add_argument("--prompt-tokens", type=int, default=512)
    parser.add_argument("--gen-tokens", type=int, default=48)
    args = parser.parse_args()
    runner.Runner.forward = recording(runner.Runner.forward)
    loaded = build_random_model(args.shape)
    vocab = loaded.config["vocab_size"]
    for attempt in ("warm-up", "measured"):
        scheduler = make_scheduler(loaded, EngineConfig(max_running=args.streams))
        scheduler.warm_up()
        for i in range(args.requests):
            prompt = [(7 * i + j) % (vocab - 1) + 1 for j in range(args.prompt_tokens)]
            scheduler.add(Request(prompt, SamplingParams(max_tokens=args.gen_tokens, temperature=0.0, ignore_eos=True)))
        steps = []
        start = time.perf_counter()
        while scheduler.has_work():
            STEP.clear()
            t0 = time.perf_counter()
            scheduler.step()
            t1 = time.perf_counter()
            mx.synchronize()
            t2 = time.perf_counter()
            steps.append((t2 - t0, t1 - t0, t2 - t1, STEP.get("decode", 0), STEP.get("chunks", [])))
        total = time.perf_counter() - start
    graphs = os.environ.get("MLX_USE_CUDA_GRAPHS", "unset")
    print(f"{args.shape}: {total:.2f} s for {len(steps)} steps (MLX_USE_CUDA_GRAPHS={graphs})")
    for name, chosen in (("decode only", [s for s in steps if not s[4]]), ("with prefill", [s for s in steps if s[4]])):
        n = max(len(chosen), 1)
        host = 1e3 * sum(s[1] for s in chosen) / n
        device = 1e3 * sum(s[2] for s in chosen) / n
        print(f"  {name:13s} {len(chosen):4d} steps: host {host:7.1f} ms + device {device:5.1f} ms per step")
    for wall, host, device, decode, chunks in sorted(steps, key=lambda s: -s[0])[:6]:
        print(f"  slow: {1e3 * wall:6.1f} ms (host {1e3 * host:.1f}) with {decode} decoding rows, chunks {chunks}")


if __name__ == "__main__":
    main()
