"""Python graph-building time of steady decode steps (Runner.forward), with the device
synchronised before each step so that nothing else runs meanwhile.

Building the graph is host work that every back-end pays alike, so a CPU measures it: a
model's layer structure at a narrow width (a tiny shape with the real model's number of
layers) keeps the CPU's own evaluation of the steps short. Prints the minimum and median of
twelve blocks of 30 steps, per number of streams.

`--compare-eager-mixes` times a second copy of the model beside it whose mixes all run
outside the compiled pieces (as before llama.run_layers let a decoding step's recurrence run
inside them), the two taking turns block by block, so that both see the same machine.

    PYTHONPATH=src:scripts python3 scripts/build_time.py tiny-qwen3.5 --layers 24 --streams 1,8 --compare-eager-mixes
    PYTHONPATH=src:scripts python3 scripts/build_time.py tiny --layers 28 --streams 1,8
"""

import argparse
import statistics

import mlx.core as mx

from mlxserve import random_weights, runner
from mlxserve.random_weights import build_random_model
from phases import SPENT, timed
from steady_decode import decoding_scheduler


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("shape", help="a random-weights shape, e.g. tiny or tiny-qwen3.5")
    parser.add_argument("--layers", type=int, help="number of layers (default: the shape's)")
    parser.add_argument("--streams", default="1,8", help="comma-separated numbers of decoding rows")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--compare-eager-mixes", action="store_true",
                        help="also time the model with every mix outside the compiled pieces")
    args = parser.parse_args()
    shape = args.shape
    if args.layers:
        shape = f"{args.shape}-{args.layers}-layers"
        random_weights.SHAPES[shape] = dict(random_weights.SHAPES[args.shape], num_hidden_layers=args.layers)
    build = timed("build", runner.Runner.forward)

    def synchronised_forward(self, *a, **k):
        mx.synchronize()
        return build(self, *a, **k)

    runner.Runner.forward = synchronised_forward
    models = {"": build_random_model(shape, dtype=args.dtype)}
    if args.compare_eager_mixes:
        eager = models["eager mixes "] = build_random_model(shape, dtype=args.dtype, seed=1)
        for layer in eager.model.layers:
            layer.traced_mix_inputs = lambda batch: None
    for streams in (int(s) for s in args.streams.split(",")):
        schedulers = {name: decoding_scheduler(loaded, streams, max_tokens=1000, warm_steps=20)
                      for name, loaded in models.items()}
        blocks = {name: [] for name in models}
        for _ in range(12):
            for name, scheduler in schedulers.items():
                SPENT.clear()
                for _ in range(30):
                    scheduler.step()
                blocks[name].append(1e3 * SPENT["build"] / 30)
        for name, times in blocks.items():
            print(f"{shape}, {name}{streams} streams: graph building {min(times):.2f} ms/step min, "
                  f"{statistics.median(times):.2f} median")

if __name__ == "__main__":
    main()
