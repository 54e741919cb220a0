"""What a matrix product costs the host, by its number of rows, at Qwen3 shapes (bf16): each
case is built and queued (mx.async_eval) REPEAT times, then synchronized once; printed per
repeat are the time until done and the host's share.

On MLX's CUDA back-end a one-row product (decoding one stream) runs MLX's own
matrix-vector kernel; any other goes through cuBLASLt, which MLX sets up afresh at every
call (descriptors and an algorithm query). So a step whose products have more than one row
(prefill chunks, several streams) pays that setup once per product on the host. Each case is
also timed as `mx.gather_mm` with explicit indices, which MLX's CUDA back-end runs with a
kernel of its own (no cuBLAS), and as `mx.conv1d` with a kernel width of one, which MLX's CUDA
back-end runs through cuDNN with its execution plan cached by shape, each with its largest
difference from the plain product.

    PYTHONPATH=src:scripts python3 scripts/bench_matmul_host.py [--repeat 200]
"""

import argparse

import mlx.core as mx
from bench_ops import timed  # scripts/bench_ops.py: built and queued REPEAT times, synchronized once

DT = mx.bfloat16
# A layer's products at Qwen3 shapes (fused qkv and gate_up): (label, in features, out features).
LAYER_PRODUCTS = (("Qwen3-0.6B qkv", 1024, 4096), ("Qwen3-0.6B o_proj", 2048, 1024),
                  ("Qwen3-0.6B gate_up", 1024, 6144), ("Qwen3-0.6B down", 3072, 1024),
                  ("Qwen3-4B qkv", 2560, 6144), ("Qwen3-4B o_proj", 4096, 2560),
                  ("Qwen3-4B gate_up", 2560, 19456), ("Qwen3-4B down", 9728, 2560))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=200)
    r = parser.parse_args().repeat
    x0 = mx.random.normal((32, 1024)).astype(DT)
    mx.eval(x0)
    timed("add [32,1024] (an elementwise kernel)", lambda: x0 + 1, r)
    for label, k, n in (*LAYER_PRODUCTS, ("Qwen3-0.6B lm_head", 1024, 151936)):
        w = (mx.random.normal((n, k)) * 0.02).astype(DT)
        mx.eval(w)
        for m in (1, 8, 32, 128, 512) if n < 100_000 else (32,):
            x = mx.random.normal((m, k)).astype(DT)
            mx.eval(x)
            timed(f"{label} [{m},{k}] x [{k},{n}]", lambda: x @ w.T, r)
            timed("  as gather_mm", lambda: gathered(x, w.T), r, reference=x @ w.T)
            timed("  as conv1d", lambda: as_conv(x, w), r, reference=x @ w.T)
    # Attention's batched products (8 KV heads, head_dim 128) as chunk_attention runs them.
    for t, length in ((256, 8192), (64, 1024)):
        q = mx.random.normal((8, t, 128)).astype(DT)
        keys = mx.random.normal((8, length, 128)).astype(DT)
        p = mx.softmax(mx.random.normal((8, t, length)).astype(DT), axis=-1)
        mx.eval(q, keys, p)
        timed(f"scores [8,{t},128] x [8,128,{length}]", lambda: q @ keys.swapaxes(-1, -2), r)
        timed("  as gather_mm", lambda: gathered(q, keys.swapaxes(-1, -2)), r, reference=q @ keys.swapaxes(-1, -2))
        timed(f"weights [8,{t},{length}] x [8,{length},128]", lambda: p @ keys, r)
        timed("  as gather_mm", lambda: gathered(p, keys), r, reference=p @ keys)


INDICES = {n: mx.array(list(range(n)), dtype=mx.uint32) for n in (1, 8)}  # made once: no kernel per call


def as_conv(x: mx.array, w: mx.array) -> mx.array:
    """x @ w.T as a width-one convolution: x [M, K] is one sequence of M steps with K channels,
    w [N, K] is N filters of width one (MLX's layout [out, width, in]: a view, no copy)."""
    return mx.conv1d(x[None], w[:, None, :])[0]


def gathered(a: mx.array, b: mx.array) -> mx.array:
    """a @ b through mx.gather_mm: batch i of a times batch i of b (2-D: one batch)."""
    if a.ndim == 2:
        return mx.gather_mm(a[None], b[None], INDICES[1], INDICES[1])[0]
    return mx.gather_mm(a, b, INDICES[a.shape[0]], INDICES[a.shape[0]])


if __name__ == "__main__":
    main()
