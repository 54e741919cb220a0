"""mlxserve: fast local LLM inference on MLX."""

import os
import sys

__version__ = "0.1.0"

# MLX's CUDA back-end (any platform but macOS) records kernels into CUDA graphs of up to 100
# operations and replays them. A step whose graph differs from the last ones (a prefill chunk
# of a new length, rows joining) pays for building and instantiating new graphs, and mixed
# prefill-and-decode steps of a hybrid model took 170 ms instead of 62 ms with graphs off on
# an H200 (README, "Measured"). Set before MLX starts its GPU stream; an explicit setting wins.
if sys.platform != "darwin" and os.environ.get("MLX_USE_CUDA_GRAPHS") is None:
    os.environ["MLX_USE_CUDA_GRAPHS"] = "0"
