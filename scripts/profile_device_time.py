"""Whether steady decode steps wait on the host or on the device, at some numbers of streams,
on random weights at a real shape: steps run pipelined as the engine runs them (ms per step),
then synchronized one by one, split into the step's host time and the device time left after
it (medians).

    PYTHONPATH=src python3 scripts/profile_device_time.py qwen3-0.6b [--streams 1,32,64]
"""

import argparse
import time

import mlx.core as mx

from mlxserve.random_weights import build_random_model
from steady_decode import decoding_scheduler


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("shape", help="a random-weights shape, e.g. qwen3-0.6b or qwen3.5-0.8b")
    parser.add_argument("--quantize", type=int, choices=(4, 8), help="quantize the random weights to 4 or 8 bits")
    parser.add_argument("--streams", default="1,32,64", help="comma-separated numbers of decoding rows")
    parser.add_argument("--steps", type=int, default=40, help="steps measured per setting and mode")
    args = parser.parse_args()
    loaded = build_random_model(args.shape, quantize=args.quantize)
    for streams in (int(s) for s in args.streams.split(",")):
        scheduler = decoding_scheduler(loaded, streams, max_tokens=3 * args.steps + 100, warm_steps=10)
        mx.synchronize()
        start = time.perf_counter()
        for _ in range(args.steps):
            scheduler.step()
        mx.synchronize()
        pipelined = (time.perf_counter() - start) / args.steps
        host, device = [], []
        for _ in range(args.steps):
            mx.synchronize()
            t0 = time.perf_counter()
            scheduler.step()
            t1 = time.perf_counter()
            mx.synchronize()
            host.append(t1 - t0)
            device.append(time.perf_counter() - t1)
        host.sort()
        device.sort()
        middle = args.steps // 2
        print(f"{args.shape}{f' {args.quantize}-bit' if args.quantize else ''}, {streams} streams: pipelined {1e3 * pipelined:.2f} ms/step; synchronized: "
              f"host {1e3 * host[middle]:.2f} ms + device after it {1e3 * device[middle]:.2f} ms")


if __name__ == "__main__":
    main()
