"""The operations of one steady decode step's graph, as MLX's compiler leaves them (fused
elementwise chains as Compiled*), counted by primitive: what the step asks the back-end to
run, on any back-end. Views (reshapes, slices, broadcasts) are counted apart: they launch
nothing. On the CPU some operations that are one kernel on a GPU show as several (rms_norm as
its fallback: a conversion, Square, Sum and a fused kernel), so compare counts from one
back-end only; `scripts/kernel_census.py` counts a GPU's kernels.

    PYTHONPATH=src:scripts python3 scripts/step_graph.py qwen3.5-0.8b [--streams 1]
"""

import argparse
import collections
import os
import re
import tempfile

import mlx.core as mx

from mlxserve import scheduler
from mlxserve.random_weights import build_random_model
from steady_decode import decoding_scheduler

VIEWS = {"Reshape", "Broadcast", "Squeeze", "ExpandDims", "Slice", "Split", "Transpose"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("shape", help="a random-weights shape, e.g. qwen3-0.6b or qwen3.5-0.8b")
    parser.add_argument("--streams", type=int, default=1, help="decoding rows")
    args = parser.parse_args()
    loaded = build_random_model(args.shape)
    steps = decoding_scheduler(loaded, args.streams, max_tokens=100, warm_steps=2)
    graphs = []
    launch = scheduler.Scheduler._launch

    def exported_launch(self, feeds, rows):
        # The graph is exported before the step is evaluated: evaluation detaches it.
        outputs, inflight = launch(self, feeds, rows)
        path = os.path.join(tempfile.mkdtemp(), "step.dot")
        mx.export_to_dot(path, *outputs)
        graphs.append(path)
        return outputs, inflight

    scheduler.Scheduler._launch = exported_launch
    steps.step()
    names = re.findall(r'label ="?([A-Za-z0-9_]+)', open(graphs[0]).read())
    ops = collections.Counter(name for name in names if name not in VIEWS)
    views = collections.Counter(name for name in names if name in VIEWS)
    print(f"{args.shape}, {args.streams} streams, {mx.default_device()}: {sum(ops.values())} operations, "
          f"{sum(views.values())} views")
    for name, n in ops.most_common():
        print(f"{n:5d}  {name[:100]}")
    print("views: " + ", ".join(f"{n} {name}" for name, n in views.most_common()))


if __name__ == "__main__":
    main()
