"""What a prompt length costs the first time a server meets it: lone prompts of several
lengths on a fresh, warmed-up engine, each one's time to first token when its step shapes
are new (compiled pieces traced, kernels and cuDNN plans built) and again when they are
known. Random weights at a real shape. (On a GPU a step with a prompt chunk is padded to a
multiple of 64 tokens and run compiled, so each new padded size is a new trace, and each new
pair of chunk length and rounded key length a new cuDNN plan: with steps of up to 2,048 tokens
where no row decodes, there are up to 32 such sizes where there were 8.) The warm-up's time
is printed too: on a machine that has never run the model, MLX's CUDA back-end first builds
its kernels (a Qwen3.5-0.8B warm-up took 38 s on a fresh H100, 0.24 s in the next process),
so a first use measured there also includes such builds: run it after another command.

    PYTHONPATH=src:scripts python3 scripts/first_use_cost.py qwen3-0.6b [--lengths 300,700,1100] \\
        [--max-batch-tokens N] [--mixed-batch-tokens N]
"""

import argparse
import time

import numpy as np
from bench_variant import apply_tunings  # scripts/bench_variant.py: A/B tunings by environment variables

from mlxserve.engine import EngineConfig, make_scheduler
from mlxserve.random_weights import build_random_model
from mlxserve.sampling import SamplingParams
from mlxserve.scheduler import Request


def first_token_time(scheduler, prompt: list[int]) -> tuple[float, list[float]]:
    """Seconds from adding the prompt to its first token, and the seconds each step took
    until then (a step's call: it may return before the device has finished it)."""
    start = time.perf_counter()
    scheduler.add(Request(prompt, SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)))
    steps = []
    first = None
    while first is None:
        began = time.perf_counter()
        events = scheduler.step()
        steps.append(time.perf_counter() - began)
        if any(e.token_ids for e in events):
            first = time.perf_counter() - start
    while scheduler.has_work():
        scheduler.step()
    return first, steps


def milliseconds(seconds: list[float]) -> str:
    return " ".join(f"{1e3 * s:.0f}" for s in seconds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("shape")
    parser.add_argument("--lengths", default="300,700,1100,1500,1900,2500,4000")
    parser.add_argument("--max-batch-tokens", type=int)
    parser.add_argument("--mixed-batch-tokens", type=int)
    args = parser.parse_args()
    apply_tunings()
    loaded = build_random_model(args.shape)
    given = {"max_batch_tokens": args.max_batch_tokens, "mixed_batch_tokens": args.mixed_batch_tokens}
    # No prefix cache: the second prompt of a length must compute what the first did.
    config = EngineConfig(prefix_cache=False, **{k: v for k, v in given.items() if v is not None})
    scheduler = make_scheduler(loaded, config)
    began = time.perf_counter()
    scheduler.warm_up()
    print(f"warm-up {time.perf_counter() - began:.2f} s", flush=True)
    rng = np.random.default_rng(0)
    vocab = loaded.config["vocab_size"]
    print(f"{args.shape}, max_batch_tokens {scheduler.config.max_batch_tokens}, mixed_batch_tokens {config.mixed_batch_tokens}")
    for length in (int(x) for x in args.lengths.split(",")):
        new, new_steps = first_token_time(scheduler, rng.integers(0, vocab, length).tolist())
        known, known_steps = first_token_time(scheduler, rng.integers(0, vocab, length).tolist())
        print(f"{length:>6} tokens, {len(new_steps)} steps: first use {1e3 * new:8.1f} ms, again {1e3 * known:8.1f} ms"
              f"  (steps, ms: {milliseconds(new_steps)}; again {milliseconds(known_steps)})", flush=True)


if __name__ == "__main__":
    main()
