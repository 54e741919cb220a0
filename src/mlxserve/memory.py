"""How much memory the KV cache may use by default, from what the device reports."""

from __future__ import annotations

import math

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


_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_size(text: str) -> int:
    """'8GB', '512MiB', '1.5 GB' or a plain number of bytes -> bytes."""
    value = text.strip().lower().replace(" ", "")
    number = value.rstrip("abcdefghijklmnopqrstuvwxyz")
    unit = value[len(number):]
    try:
        size = float(number) * _UNITS[unit]
    except (ValueError, KeyError):
        raise ValueError(f"--memory-budget: '{text}' is not a size (e.g. 8GB, 512MiB)") from None
    if not math.isfinite(size):  # "1e400" parses as infinity
        raise ValueError(f"--memory-budget: '{text}' is not a finite size")
    if size <= 0:
        raise ValueError(f"--memory-budget: must be positive, got '{text}'")
    return int(size)

