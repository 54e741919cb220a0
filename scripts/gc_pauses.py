"""What Python's garbage collector costs an mlxserve process.

    PYTHONPATH=src python3 scripts/gc_pauses.py
        a full collection in a process that imported the front ends and mlx-lm and built a
        model, before and after gc.freeze() (what engine.settle_garbage_collector does);
    PYTHONPATH=src python3 scripts/gc_pauses.py bench ARGS...
        runs `mlxserve bench ARGS...` and reports every collection it went through, per
        generation: how many, the longest, the total.
"""

import atexit
import gc
import importlib
import runpy
import sys
import time


def full_collection_ms() -> float:
    start = time.perf_counter()
    gc.collect()
    return 1e3 * (time.perf_counter() - start)


def freeze_comparison() -> None:
    # What the front ends import (and the bench's --compare: mlx-lm).
    for module in ("mlx_lm", "mlxserve.bench", "mlxserve.repl", "mlxserve.server"):
        importlib.import_module(module)
    from mlxserve.random_weights import build_random_model

    build_random_model("tiny", dtype="float32")
    print(f"{len(gc.get_objects()):,} tracked objects")
    print("full collection:", ", ".join(f"{full_collection_ms():.2f}" for _ in range(3)), "ms")
    gc.freeze()
    print("after gc.freeze():", ", ".join(f"{full_collection_ms():.2f}" for _ in range(3)), "ms")


def watch_cli(args: list[str]) -> None:
    pauses: dict[int, list[float]] = {0: [], 1: [], 2: []}
    started = [0.0]

    def callback(phase: str, info: dict) -> None:
        if phase == "start":
            started[0] = time.perf_counter()
        else:
            pauses[info["generation"]].append(time.perf_counter() - started[0])

    gc.callbacks.append(callback)

    @atexit.register
    def report() -> None:
        for generation, times in pauses.items():
            if times:
                print(f"gc generation {generation}: {len(times)} collections, longest {1e3 * max(times):.2f} ms, "
                      f"total {1e3 * sum(times):.1f} ms", file=sys.stderr)

    sys.argv = ["mlxserve", *args]
    runpy.run_module("mlxserve", run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    if len(sys.argv) > 1:
        watch_cli(sys.argv[1:])
    else:
        freeze_comparison()
