"""Step by step, what a long prompt's admission costs the rows decoding beside it: each step
synchronized, its host time and the device's remainder, the prompt's chunk and how many keys
that chunk attends over, against the steady decode step before the prompt arrives. The steps
behind the long-prompt bench's ITL p99 (`mlxserve bench --long-prompt-tokens`) show up here.

    PYTHONPATH=src python3 scripts/profile_long_prompt.py qwen3-0.6b [--streams 8]
        [--prompt-tokens 16384] [--max-batch-tokens 512] [--chunk-attention-max-tokens N]
        [--pipelined]

--pipelined runs the steps as the engine does (not synchronized): a step's time then holds
its wait for the previous step's device work (a step with a chunk waits for it, see
Scheduler._wait_for_device), so each listed step names the previous step's chunk too, and the
steps are also summed up by chunk size.

Each listed step shows its host time split into admission, graph building (Runner.forward)
and MLX encoding (mx.async_eval). --chunk-attention-max-tokens sets
batch.CHUNK_ATTENTION_MAX_TOKENS (0: every chunk through MLX's fused attention) to compare.
"""

import argparse
import time

import mlx.core as mx

from mlxserve import batch, runner
from mlxserve import scheduler as scheduler_module
from mlxserve.engine import EngineConfig, make_scheduler
from mlxserve.random_weights import build_random_model
from mlxserve.sampling import SamplingParams
from mlxserve.scheduler import Request
from bench_variant import apply_tunings
from phases import SPENT as PHASES, timed

apply_tunings()  # the tunings of scripts/bench_variant.py named by environment variables


def synced_step(sched) -> tuple[float, float]:
    PHASES.clear()
    start = time.perf_counter()
    sched.step()
    host = time.perf_counter() - start
    mx.synchronize()
    return host, time.perf_counter() - start - host


def pipelined_step(sched) -> tuple[float, float]:
    PHASES.clear()
    start = time.perf_counter()
    sched.step()
    return time.perf_counter() - start, 0.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("shape")
    parser.add_argument("--streams", type=int, default=8)
    parser.add_argument("--prompt-tokens", type=int, default=16384)
    parser.add_argument("--max-batch-tokens", type=int, default=512)
    parser.add_argument("--show", type=int, default=10, help="the slowest steps listed")
    parser.add_argument("--chunk-attention-max-tokens", type=int, default=batch.CHUNK_ATTENTION_MAX_TOKENS)
    parser.add_argument("--pipelined", action="store_true", help="steps not synchronized, as the engine runs them")
    args = parser.parse_args()
    step = pipelined_step if args.pipelined else synced_step
    batch.CHUNK_ATTENTION_MAX_TOKENS = args.chunk_attention_max_tokens
    scheduler_module.Scheduler._admit = timed("admit", scheduler_module.Scheduler._admit)
    runner.Runner.forward = timed("build", runner.Runner.forward)
    scheduler_module.mx.async_eval = timed("encode", mx.async_eval)
    loaded = build_random_model(args.shape)
    vocab = loaded.config["vocab_size"]
    sched = make_scheduler(loaded, EngineConfig(max_batch_tokens=args.max_batch_tokens))
    sched.warm_up()
    params = SamplingParams(max_tokens=100_000, temperature=0.0, ignore_eos=True)
    for i in range(args.streams):
        sched.add(Request(mx.random.randint(0, vocab, (256,)).tolist(), params))
    for attempt in ("warm-up", "measured"):  # the first admission builds kernels for its shapes
        while sched.waiting or not all(row.num_generated > 2 for row in sched.running):
            sched.step()
        steady = [sum(synced_step(sched)) for _ in range(30)]
        long = Request(mx.random.randint(0, vocab, (args.prompt_tokens,)).tolist(), SamplingParams(max_tokens=1))
        sched.add(long)
        steps = []
        while any(row.id == long.id for row in list(sched.waiting) + sched.running):
            row = next((r for r in sched.running if r.id == long.id), None)
            before = row.cache.length if row is not None else 0
            host, device = step(sched)
            row = next((r for r in sched.running if r.id == long.id), None)
            after = row.cache.length if row is not None else before  # (gone: it finished)
            steps.append((host + device, host, device, after - before, after, dict(PHASES)))
    steady_ms = 1e3 * sorted(steady)[len(steady) // 2]
    total = [s[0] for s in steps]
    print(f"{args.shape}: {args.streams} streams decoding, steady step p50 {steady_ms:.2f} ms; "
          f"a {args.prompt_tokens}-token prompt took {len(steps)} steps, "
          f"p50 {1e3 * sorted(total)[len(total) // 2]:.2f} ms, max {1e3 * max(total):.2f} ms")
    previous = {id(s): p for p, s in zip([None] + steps, steps)}
    for s in sorted(steps, key=lambda s: -s[0])[: args.show]:
        t, host, device, chunk, keys, phases = s
        split = ", ".join(f"{name} {1e3 * seconds:.2f}" for name, seconds in phases.items())
        if args.pipelined:
            before = previous[id(s)]
            after = f"; the step before: chunk {before[3]:4d}, {before[4]:6d} keys" if before else ""
            print(f"  {1e3 * t:7.2f} ms ({split}): chunk {chunk:4d} tokens, {keys:6d} keys after it{after}")
        else:
            print(f"  {1e3 * t:7.2f} ms (host {1e3 * host:6.2f}: {split}; device after it {1e3 * device:6.2f}): "
                  f"chunk {chunk:4d} tokens, {keys:6d} keys after it")
    by_chunk: dict[int, list[float]] = {}
    for s in steps:
        by_chunk.setdefault(s[3], []).append(s[0])
    for chunk, times in sorted(by_chunk.items(), reverse=True):
        times.sort()
        print(f"  chunks of {chunk:4d} tokens: {len(times):3d} steps, p50 {1e3 * times[len(times) // 2]:6.2f} ms, "
              f"max {1e3 * times[-1]:6.2f} ms")


if __name__ == "__main__":
    main()
