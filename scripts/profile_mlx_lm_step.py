"""mlx-lm's own single-stream decode step on the same random weights as mlxserve's bench,
each step synchronized: the host's time building the graph (the model call) and encoding it
(mx.async_eval), then the device's work left after it (medians), for comparison with
scripts/profile_device_time.py and scripts/profile_step.py.

    PYTHONPATH=src python3 scripts/profile_mlx_lm_step.py qwen3-4b [--quantize 4]
"""

import argparse
import statistics
import time

import mlx.core as mx
from mlx_lm.models.cache import make_prompt_cache

from mlxserve.bench import mlx_lm_model
from mlxserve.random_weights import build_random_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("shape", help="a random-weights shape, e.g. qwen3-4b")
    parser.add_argument("--quantize", type=int, choices=(4, 8), help="quantize the random weights to 4 or 8 bits")
    parser.add_argument("--prompt-tokens", type=int, default=512)
    parser.add_argument("--steps", type=int, default=50)
    args = parser.parse_args()
    model = mlx_lm_model(build_random_model(args.shape, quantize=args.quantize))
    cache = make_prompt_cache(model)
    mx.eval(model(mx.random.randint(0, 1000, (1, args.prompt_tokens)), cache=cache))
    token = mx.array([[1]])
    build, encode, device = [], [], []
    for step in range(args.steps + 10):
        mx.synchronize()
        t0 = time.perf_counter()
        logits = model(token, cache=cache)
        t1 = time.perf_counter()
        token = mx.argmax(logits[:, -1], axis=-1, keepdims=True)
        mx.async_eval(token)
        t2 = time.perf_counter()
        mx.synchronize()
        t3 = time.perf_counter()
        if step >= 10:  # after the first steps' kernel builds
            build.append(t1 - t0)
            encode.append(t2 - t1)
            device.append(t3 - t2)
    ms = lambda xs: 1e3 * statistics.median(xs)  # noqa: E731
    label = f"{args.shape}{f' {args.quantize}-bit' if args.quantize else ''}"
    print(f"mlx-lm {label}, 1 stream, synchronized: build {ms(build):.2f} ms + encode {ms(encode):.2f} ms "
          f"+ device after it {ms(device):.2f} ms")


if __name__ == "__main__":
    main()
