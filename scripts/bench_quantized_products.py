"""What a quantized matrix product costs by its number of rows, against the same product
with the weight dequantized first (mx.dequantize, then a plain product), at Qwen3
shapes: each case built and queued REPEAT times, then synchronized once (bench_ops.timed),
with the largest difference of the second form from the first.

A product of many rows (a prefill chunk) reads its weight once and does much arithmetic with
it; whether MLX's quantized kernel or a dequantized weight through the back-end's dense
product is faster there depends on the back-end, which this measures.

On a machine that has not run these shapes before, MLX's CUDA back-end first builds kernels
for each new case (a fresh H100 got through three row counts of one shape in its first 60 s):
run it twice, read the second.

    PYTHONPATH=src:scripts python3 scripts/bench_quantized_products.py [--repeat 50] [--bits 4] [--group-size 64]
        [--dtype bfloat16] [--rows 1,4,16,32,64,128,512,2048]
"""

import argparse

import mlx.core as mx
from bench_matmul_host import LAYER_PRODUCTS
from bench_ops import timed  # scripts/bench_ops.py: built and queued REPEAT times, synchronized once


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=50)
    parser.add_argument("--bits", type=int, default=4)
    parser.add_argument("--group-size", type=int, default=64)
    parser.add_argument("--dtype", choices=("bfloat16", "float16"), default="bfloat16")
    parser.add_argument("--rows", default="1,4,16,32,64,128,512,2048")
    args = parser.parse_args()
    bits, group, dt = args.bits, args.group_size, getattr(mx, args.dtype)
    for label, k, n in LAYER_PRODUCTS:
        w = (mx.random.normal((n, k)) * 0.02).astype(dt)
        wq, scales, biases = mx.quantize(w, group_size=group, bits=bits)
        mx.eval(wq, scales, biases)
        del w
        for m in (int(r) for r in args.rows.split(",")):
            x = mx.random.normal((m, k)).astype(dt)
            mx.eval(x)

            def quantized():
                return mx.quantized_matmul(x, wq, scales, biases, transpose=True, group_size=group, bits=bits)

            def dequantized():
                return x @ mx.dequantize(wq, scales, biases, group_size=group, bits=bits).T

            reference = quantized()
            timed(f"{label} [{m},{k}] x [{k},{n}] {bits}-bit g{group} {args.dtype}", quantized, args.repeat)
            timed("  dequantized first", dequantized, args.repeat, reference=reference)


if __name__ == "__main__":
    main()
