"""The attention of decoding rows (cache.decode_attention) at a real shape, for a model's
worth of layers: the host's time to build and encode it, and the time until the device is
done, against its Q·K product alone and MLX's fused attention without per-row lengths (a
lower bound: it cannot mask rows of different lengths).

    PYTHONPATH=src python3 scripts/bench_decode_attention.py [--rows 32,64] [--keys 588]
        [--layers 28] [--heads 16] [--kv-heads 8] [--head-dim 128]
"""

import argparse
import time

import mlx.core as mx

from mlxserve.cache import decode_attention


def timed(fn, layers: int, repeats: int = 12) -> tuple[float, float]:
    """Medians over repeats (after two) of (host build + encode, until the device is done), ms."""
    host, total = [], []
    for rep in range(repeats):
        mx.synchronize()
        t0 = time.perf_counter()
        mx.async_eval([fn(i) for i in range(layers)])
        t1 = time.perf_counter()
        mx.synchronize()
        if rep >= 2:
            host.append(t1 - t0)
            total.append(time.perf_counter() - t0)
    host.sort()
    total.sort()
    return 1e3 * host[len(host) // 2], 1e3 * total[len(total) // 2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", default="32,64")
    parser.add_argument("--keys", type=int, default=588)
    parser.add_argument("--layers", type=int, default=28)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=128)
    args = parser.parse_args()
    H, KV, d, L = args.heads, args.kv_heads, args.head_dim, args.keys
    capacity = 256
    while capacity < L:
        capacity *= 2
    for n in (int(r) for r in args.rows.split(",")):
        # As a step has them: Q a view of the joint Q/K output, K and V slices of a shelf.
        qk = [mx.random.normal((n, H + KV, d)).astype(mx.bfloat16) for _ in range(args.layers)]
        shelves = [mx.random.normal((2, n, KV, capacity, d)).astype(mx.bfloat16) for _ in range(args.layers)]
        lengths = mx.arange(L - n, L)[:, None, None, None]
        mask = mx.where(mx.arange(L)[None, None, None, :] <= lengths, 0.0, -float("inf")).astype(mx.bfloat16)
        mx.eval(qk, shelves, mask)

        def attention(i):
            return decode_attention(qk[i][:, :H], shelves[i][0, :, :, :L], shelves[i][1, :, :, :L], mask, d**-0.5)

        def qk_product(i):
            return qk[i][:, :H].reshape(n, KV, H // KV, d) @ shelves[i][0, :, :, :L].swapaxes(-1, -2)

        def fused_unmasked(i):
            q = qk[i][:, :H].reshape(n, H, 1, d)
            return mx.fast.scaled_dot_product_attention(q, shelves[i][0, :, :, :L], shelves[i][1, :, :, :L],
                                                        scale=d**-0.5)

        for name, fn in (("decode_attention", attention), ("its Q·K product alone", qk_product),
                         ("fused, unmasked", fused_unmasked)):
            host, total = timed(fn, args.layers)
            print(f"{n} rows x {L} keys, {args.layers} layers, {name}: host {host:.2f} ms, done after {total:.2f} ms")


if __name__ == "__main__":
    main()
