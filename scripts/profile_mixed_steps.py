"""Where a closed-loop run's time goes, step by step, on random weights at a real shape (see
mlxserve.random_weights.SHAPES), for one or more step budgets (--max-batch-tokens).

For each budget, three passes over the same requests (all queued at once, at most --streams
running, which is a closed loop):
  warm-up     builds kernels and traces, not reported;
  pipelined   as the engine runs (no extra synchronization): wall time, steps, generated tok/s;
  synced      every step synchronized, its host time split into phases (admission and
              planning, graph building, sampling, encoding, reading back) and the device's
              remainder, for decode-only steps and for steps that also prefill.

    PYTHONPATH=src python3 scripts/profile_mixed_steps.py qwen3-0.6b [--streams 32]
        [--requests 64] [--prompt-tokens 512] [--gen-tokens 128] [--max-batch-tokens 512,2048]

Compare MLX_USE_CUDA_GRAPHS=1 (MLX's default) with mlxserve's 0 on a CUDA machine.
"""

import argparse
import collections
import os
import time

import mlx.core as mx

from mlxserve import runner, sampling, scheduler as scheduler_module
from mlxserve.engine import EngineConfig, make_scheduler
from mlxserve.random_weights import build_random_model
from mlxserve.sampling import SamplingParams
from mlxserve.scheduler import Request
from phases import SPENT as PHASES, timed

STEP: dict = {}
def recording(forward):
    def wrapper(self, feeds, previous=None):
        STEP["decode"] = sum(1 for f in feeds if len(f.tokens) == 1)
        STEP["chunks"] = [len(f.tokens) for f in feeds if len(f.tokens) > 1]
        return forward(self, feeds, previous)
    return wrapper


def instrument() -> None:
    S = scheduler_module.Scheduler
    S._admit = timed("admit", S._admit)
    S._plan = timed("plan", S._plan)
    S._wait_for_device = timed("wait", S._wait_for_device)
    S._read_back = timed("read back", S._read_back)
    runner.Runner.forward = timed("build graph", recording(runner.Runner.forward))
    sampling.Sampler.sample = timed("sample", sampling.Sampler.sample)
    scheduler_module.mx.async_eval = timed("encode", mx.async_eval)


def queued(loaded, args, budget: int):
    sched = make_scheduler(loaded, EngineConfig(max_running=args.streams, max_batch_tokens=budget))
    sched.warm_up()
    vocab = loaded.config["vocab_size"]
    params = SamplingParams(max_tokens=args.gen_tokens, temperature=0.0, ignore_eos=True)
    for i in range(args.requests):
        sched.add(Request([(7 * i + 13 * j) % (vocab - 1) + 1 for j in range(args.prompt_tokens)], params))
    return sched


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("shape")
    parser.add_argument("--streams", type=int, default=32)
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--prompt-tokens", type=int, default=512)
    parser.add_argument("--gen-tokens", type=int, default=128)
    parser.add_argument("--max-batch-tokens", default="512", help="comma-separated step budgets")
    parser.add_argument("--quantize", type=int, default=None)
    args = parser.parse_args()
    instrument()
    loaded = build_random_model(args.shape, quantize=args.quantize)
    graphs = os.environ.get("MLX_USE_CUDA_GRAPHS", "unset")
    print(f"{args.shape}: {args.requests} requests, {args.streams} streams, P={args.prompt_tokens} "
          f"G={args.gen_tokens} (MLX_USE_CUDA_GRAPHS={graphs})")
    for budget in (int(b) for b in args.max_batch_tokens.split(",")):
        for attempt in ("warm-up", "pipelined"):
            sched = queued(loaded, args, budget)
            mx.reset_peak_memory()
            steps, start = 0, time.perf_counter()
            while sched.has_work():
                sched.step()
                steps += 1
            mx.synchronize()
            wall = time.perf_counter() - start
        generated = args.requests * args.gen_tokens
        print(f"budget {budget}: pipelined {wall:.2f} s, {steps} steps ({1e3 * wall / steps:.2f} ms/step), "
              f"{generated / wall:,.0f} generated tok/s, peak memory {mx.get_peak_memory() / 1e9:.2f} GB")
        sched = queued(loaded, args, budget)
        mx.reset_peak_memory()
        rows = []
        while sched.has_work():
            STEP.clear()
            PHASES.clear()
            t0 = time.perf_counter()
            sched.step()
            t1 = time.perf_counter()
            mx.synchronize()
            t2 = time.perf_counter()
            rows.append((t1 - t0, t2 - t1, dict(PHASES), STEP.get("decode", 0), STEP.get("chunks", [])))
        print(f"  synced: peak memory {mx.get_peak_memory() / 1e9:.2f} GB")
        for name, chosen in (("decode only", [r for r in rows if not r[4]]), ("with prefill", [r for r in rows if r[4]])):
            n = max(len(chosen), 1)
            phases = collections.defaultdict(float)
            for r in chosen:
                for k, v in r[2].items():
                    phases[k] += v
            parts = "  ".join(f"{k} {1e3 * v / n:.2f}" for k, v in phases.items())
            host = 1e3 * sum(r[0] for r in chosen) / n
            device = 1e3 * sum(r[1] for r in chosen) / n
            rows_per = sum(r[3] for r in chosen) / n
            tokens = sum(sum(r[4]) for r in chosen) / n
            print(f"  {name:12s} {len(chosen):4d} steps, {rows_per:5.1f} decoding rows, {tokens:6.0f} prefill tokens: "
                  f"host {host:6.2f} ms + device {device:6.2f} ms | {parts}")
        for host, device, _, decode, chunks in sorted(rows, key=lambda r: -(r[0] + r[1]))[:3]:
            print(f"  slow: {1e3 * (host + device):6.1f} ms (host {1e3 * host:.1f}) with {decode} decoding rows, chunks {chunks}")


if __name__ == "__main__":
    main()
