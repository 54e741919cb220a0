"""Where a chat's second turn spends its time to first token, with the prefix cache and
without: per scheduler phase (admission, planning, graph building, MLX encoding, reading back)
over three runs, then a cProfile of the third, on random weights at a real shape.

    PYTHONPATH=src python3 scripts/profile_chat_turn.py qwen3-0.6b [HISTORY_TOKENS, default 4096]
"""
import sys, time, cProfile, pstats, io
import mlx.core as mx
from mlxserve import runner, scheduler as sm
from mlxserve.engine import EngineConfig, make_scheduler
from mlxserve.random_weights import build_random_model
from mlxserve.sampling import SamplingParams
from mlxserve.scheduler import Request
import numpy as np
from bench_variant import apply_tunings
from phases import SPENT as PH, timed  # scripts/phases.py

apply_tunings()  # the tunings of scripts/bench_variant.py named by environment variables
shape = sys.argv[1]; HIST = int(sys.argv[2]) if len(sys.argv) > 2 else 4096
loaded = build_random_model(shape)
V = loaded.config["vocab_size"]
S = sm.Scheduler
for n in ("_admit", "_plan", "_wait_for_device", "_read_back", "_launch"):
    setattr(S, n, timed(n, getattr(S, n)))
runner.Runner.forward = timed("forward(build)", runner.Runner.forward)
sm.mx.async_eval = timed("async_eval", mx.async_eval)
def greedy(n): return SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)
for prefix in (True, False):
  for run in range(3):
    s = make_scheduler(loaded, EngineConfig(prefix_cache=prefix))
    s.warm_up()
    rng = np.random.default_rng(run)
    hist = rng.integers(0, V, HIST).tolist(); fu = rng.integers(0, V, 32).tolist()
    s.add(Request(hist, greedy(128)))
    ans = []
    while s.has_work():
        for e in s.step(): ans += e.token_ids
    s.add(Request(hist + ans + fu, greedy(1)))
    PH.clear(); steps = 0
    prof = cProfile.Profile()
    t = time.perf_counter()
    if run == 2: prof.enable()
    first = None
    while s.has_work():
        ev = s.step(); steps += 1
        if first is None and any(e.token_ids for e in ev): first = time.perf_counter() - t
    prof.disable()
    print(f"prefix={prefix} run {run}: first token {1e3*first:.1f} ms, {steps} steps;", "  ".join(f"{k} {1e3*v:.2f}" for k, v in PH.items()))
    if run == 2:
        out = io.StringIO(); pstats.Stats(prof, stream=out).sort_stats("tottime").print_stats(18); print(out.getvalue()[-3500:])
