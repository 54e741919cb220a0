"""How much memory the KV cache may use by default, from what the device reports."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

# Share of device memory that weights + KV may take; the rest is left for activations,
# the prefix cache's slack and the rest of the machine (unified memory on Macs).
DEVICE_MEMORY_FRACTION = 0.6
MIN_KV_BUDGET_BYTES = 256 * 1024 * 1024


def device_memory_bytes() -> int | None:
    """Memory the MLX device can use: Metal's recommended working set, CUDA's total memory,
    or the machine's RAM on the CPU back-end."""
    info = mx.device_info()
    for key in ("max_recommended_working_set_size", "total_memory", "memory_size"):
        if info.get(key):
            return int(info[key])
    from .doctor import system_memory

    return system_memory().get("total_bytes")


def weight_bytes(model: nn.Module) -> int:
    return sum(p.nbytes for _, p in tree_flatten(model.parameters()))


def default_kv_budget(model: nn.Module) -> int:
    """KV bytes allowed when the user gives no --memory-budget."""
    total = device_memory_bytes()
    if total is None:
        return 4 * 1024**3
    return max(MIN_KV_BUDGET_BYTES, int(total * DEVICE_MEMORY_FRACTION) - weight_bytes(model))
