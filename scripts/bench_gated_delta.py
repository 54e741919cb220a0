"""Gated delta rule, one Qwen3.5 linear-attention layer: MLX's sequential fast op against our
chunked form (models/gated_delta.py), at 1, 512 and 4096 tokens.

    PYTHONPATH=src python3 scripts/bench_gated_delta.py [--heads 16] [--dim 128] [--tokens 1,512,4096]
"""

import argparse
import time

import mlx.core as mx

from mlxserve.models.gated_delta import gated_delta_chunked


def seconds_per_call(fn, repeats: int = 10) -> float:
    mx.eval(fn())
    mx.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        mx.eval(fn())
    mx.synchronize()
    return (time.perf_counter() - start) / repeats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--heads", type=int, default=16, help="key and value heads (default 16: Qwen3.5-0.8B)")
    parser.add_argument("--dim", type=int, default=128, help="head dimension (default 128)")
    parser.add_argument("--tokens", default="1,512,4096", help="comma-separated prompt lengths")
    args = parser.parse_args()
    print(f"MLX {mx.__version__}, device {mx.default_device()}, {args.heads} heads x {args.dim}, bf16 inputs")
    for T in (int(t) for t in args.tokens.split(",")):
        H, D = args.heads, args.dim
        q = (0.05 * mx.random.normal((1, T, H, D))).astype(mx.bfloat16)
        k = mx.random.normal((1, T, H, D))
        k = (k / mx.linalg.norm(k, axis=-1, keepdims=True)).astype(mx.bfloat16)
        v = mx.random.normal((1, T, H, D)).astype(mx.bfloat16)
        g = mx.random.uniform(0.9, 1.0, (1, T, H))
        beta = mx.random.uniform(0.0, 1.0, (1, T, H))
        state = mx.zeros((1, H, D, D))
        mx.eval(q, k, v, g, beta, state)
        fast = seconds_per_call(lambda: mx.fast.gated_delta_update(q, k, v, g, beta, state))
        chunked = seconds_per_call(lambda: gated_delta_chunked(q, k, v, g, beta, state))
        y_fast, _ = mx.fast.gated_delta_update(q, k, v, g, beta, state)
        y_chunked, _ = gated_delta_chunked(q, k, v, g, beta, state)
        diff = mx.abs(y_fast.astype(mx.float32) - y_chunked.astype(mx.float32)).max().item()
        print(f"T={T:5d}: fast op {1e3 * fast:8.3f} ms   chunked {1e3 * chunked:8.3f} ms   max|diff| {diff:.1e}")


if __name__ == "__main__":
    main()
