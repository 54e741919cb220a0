"""The operations of one Qwen3.5 linear-attention layer's compiled decode step (one token, one
row; `GatedDeltaNet._one_token`), as MLX's compiler leaves them: fused elementwise kernels
show as Compiled*, views (reshapes, slices, broadcasts) launch nothing but are nodes the host
replays at every call, counted apart. Runs on any back-end, the CPU included (where rms_norm
shows as its fallback, Square + Sum + a fused kernel; on a GPU it is one kernel).

    PYTHONPATH=src python3 scripts/recurrence_graph.py [qwen3.5-0.8b]
"""

import collections
import os
import re
import sys
import tempfile

import mlx.core as mx

from mlxserve.models import qwen3_5
from mlxserve.random_weights import shape_config

VIEWS = {"Reshape", "Broadcast", "Squeeze", "ExpandDims", "Slice", "Split", "Transpose"}


def main() -> None:
    args = qwen3_5.ModelArgs.from_config(shape_config(sys.argv[1] if len(sys.argv) > 1 else "qwen3.5-0.8b"))
    layer = qwen3_5.GatedDeltaNet(args, 0)
    layer.set_dtype(mx.bfloat16)
    qkv = mx.random.normal((1, layer.conv_dim)).astype(mx.bfloat16)
    a = mx.random.normal((1, layer.n_v)).astype(mx.bfloat16)
    conv_state, state = layer._zero_state()
    conv_state, state = conv_state[None], state[None]
    mx.eval(layer.parameters(), qkv, a, conv_state, state)
    layer._made_constants()  # outside the trace, as the model does
    outputs = mx.compile(layer._one_token)(qkv, a, a, conv_state, state)
    path = os.path.join(tempfile.mkdtemp(), "recurrence.dot")
    mx.export_to_dot(path, *outputs)
    names = re.findall(r'label ="?([A-Za-z0-9_]+)', open(path).read())
    counts = collections.Counter(name for name in names if name not in VIEWS)
    views = collections.Counter(name for name in names if name in VIEWS)
    print(f"{sum(counts.values())} operations that compute:")
    for name, n in counts.most_common():
        print(f"{n:4d}  {name[:100]}")
    print(f"{sum(views.values())} views: " + ", ".join(f"{n} {name}" for name, n in views.most_common()))


if __name__ == "__main__":
    main()
