"""`mlxserve bench ARGS...` with every engine step timed: at the end, the largest gaps between
steps and the slowest steps, each with its phases (admission, planning, graph building,
MLX encoding, waiting for the device, reading back), the number of running rows, the
lengths reached by the rows still prefilling, and any garbage collection inside it. The
steps of the warm-up run are listed too (their first use of a shape costs most); the time
column says when each step began, from the first.

A bench's ITL p99 over several streams is in effect its slowest step (every stream sees
it), so this lists what the long-prompt stall figure is made of, as the engine ran it
beside the bench's event loop (`scripts/profile_long_prompt.py` runs the steps alone).

    PYTHONPATH=src:scripts python3 scripts/bench_slowest_steps.py bench --random-weights qwen3-0.6b \\
        --concurrency 8 --gen-tokens 64 --long-prompt-tokens 16384 --runs 2
"""

import atexit
import gc
import sys
import time

import mlx.core as mx

from mlxserve import runner
from mlxserve import scheduler as scheduler_module
from mlxserve.cli import main
from phases import SPENT, timed

SHOWN = 16
steps: list[tuple] = []  # (start, seconds, phases, running rows, prefilling rows' lengths)
collections: list[tuple] = []  # (time, "start" or "stop", generation)


def instrument() -> None:
    cls = scheduler_module.Scheduler
    for name in ("_admit", "_plan", "_wait_for_device", "_read_back", "_launch"):
        setattr(cls, name, timed(name, getattr(cls, name)))
    runner.Runner.forward = timed("build", runner.Runner.forward)
    scheduler_module.mx.async_eval = timed("encode", mx.async_eval)
    gc.callbacks.append(lambda phase, info: collections.append((time.perf_counter(), phase, info["generation"])))
    step = cls.step

    def timed_step(self):
        SPENT.clear()
        start = time.perf_counter()
        events = step(self)
        prefilling = [row.cache.length for row in self.running if not row.is_decoding]
        steps.append((start, time.perf_counter() - start, dict(SPENT), len(self.running), prefilling))
        return events

    cls.step = timed_step


def report() -> None:
    if len(steps) < 2:
        return
    steps.sort(key=lambda s: s[0])
    origin = steps[0][0]
    gaps = sorted(((b[0] - a[0] - a[1], a[0] + a[1] - origin) for a, b in zip(steps, steps[1:])), reverse=True)
    print("largest gaps between steps (ms, at s):", [(round(1e3 * g, 2), round(t, 3)) for g, t in gaps[:10]])
    for start, seconds, phases, running, prefilling in sorted(steps, key=lambda s: -s[1])[:SHOWN]:
        inside = [(round(1e3 * (t - start), 2), phase, generation) for t, phase, generation in collections
                  if start <= t <= start + seconds]
        print(f"{1e3 * seconds:8.2f} ms at {start - origin:8.3f} s, {running} rows, prefilling at {prefilling}: "
              + " ".join(f"{k} {1e3 * v:.2f}" for k, v in phases.items()) + (f"; gc {inside}" if inside else ""))


if __name__ == "__main__":
    instrument()
    atexit.register(report)
    sys.exit(main(sys.argv[1:]))
