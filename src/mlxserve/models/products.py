"""Matrix products of several rows as width-one convolutions, for MLX's CUDA back-end.

MLX's CUDA back-end runs a product of one row with its own matrix-vector kernel, but any
product of more rows through cuBLASLt, which it sets up afresh at every call: new
descriptors and an algorithm query (32-38 us of host time per product on an H200 in an
earlier session, 17.5-26.1 us on the H100 of session 22; `scripts/bench_matmul_host.py`).
A step of 32 decoding Qwen3-4B rows makes 144 such products, and a chat turn's 96-token
Qwen3-0.6B chunk 112, so that setup is a large share of those steps, which are bound by the
host. A convolution with kernels of width one computes the same product (x [M, K] is a
sequence of M positions with K channels, the weight [N, K] is N filters of width one: MLX's
[out, width, in] layout, a view), and MLX runs it through cuDNN with the execution plan
cached by shape, so a shape seen before costs only the launch.

It does not pay, measured on an H100 (MLX 0.32.4, docs/performance-history.md, session 22):
cuDNN's execution costs the host more than cuBLASLt's setup and launch, 29.8-35.3 against
17.5-26.1 us for the products of 32 to 192 rows of Qwen3-0.6B and Qwen3-4B (55.7 against
43.1 us for Qwen3-4B's gate_up), and a chat's cached turn took 7.9 against 7.4 ms. So
`enabled` stays off; `scripts/bench_variant.py` turns it on (`LINEAR_AS_CONV=1`) for another
look on another back-end or MLX version. The swap is made once, after loading
(`use_conv_products`); one-row products keep MLX's matrix-vector kernel.
"""

from __future__ import annotations

import math

import mlx.core as mx
import mlx.nn as nn

# Whether models are built with ConvLinear for their plain linear layers. Off: slower on an
# H100 (see the module's docstring).
enabled = False


class ConvLinear(nn.Linear):
    """nn.Linear whose products of more than one row run as width-one convolutions."""

    def __call__(self, x: mx.array) -> mx.array:
        rows = math.prod(x.shape[:-1])
        if rows <= 1:
            return super().__call__(x)
        weight = self["weight"]
        y = mx.conv1d(x.reshape(1, rows, x.shape[-1]), weight[:, None, :])
        y = y.reshape(*x.shape[:-1], weight.shape[0])
        return y + self["bias"] if "bias" in self else y


def use_conv_products(model: nn.Module) -> int:
    """Replace every plain nn.Linear of `model` (quantized layers and subclasses stay) by a
    ConvLinear holding the same arrays. Returns how many were replaced."""
    replaced = 0
    for module in model.modules():
        for name, child in list(module.items()):
            swapped = _swapped(child)
            if swapped is not None:
                module[name] = swapped
                replaced += 1
            elif isinstance(child, list):
                for i, item in enumerate(child):
                    swapped = _swapped(item)
                    if swapped is not None:
                        child[i] = swapped
                        replaced += 1
    return replaced


def _swapped(child: object) -> ConvLinear | None:
    if type(child) is not nn.Linear:
        return None
    new = ConvLinear.__new__(ConvLinear)
    nn.Module.__init__(new)
    for key, value in child.items():
        setattr(new, key, value)
    return new
