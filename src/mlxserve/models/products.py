"""Two other ways of running matrix products of several rows, for MLX's CUDA back-end.

Quantized layers: dequantize first (on by default on a CUDA GPU)
-----------------------------------------------------------------
MLX's quantized matrix product on its CUDA back-end is made for few rows: a prefill chunk
through it took far longer than the same chunk through a bf16 model. On H100s (MLX 0.32.4,
docs/performance-history.md, session 37) random Qwen3-4B weights at 4 bits took 44.6-46.0 ms
to the first token of a 512-token prompt and 294.3 ms for a 4,223-token chat history, where
bf16 weights took 16.1 and 104.4 (another lease). A layer that dequantizes its weight into
the activations' dtype and multiplies it plainly (cuBLAS) writes and reads the whole matrix
once per product, which a product of many rows repays: dequantizing from 16, 64 or 256 rows,
the same prompts took 23.4-25.2 and 130.9-134.4 ms. A chat's cached turn (one step of 64
rows, its 33 new tokens padded) took 19.9 ms dequantized (from 16 rows) against 24.7 and 25.5
through MLX's kernel; for Qwen3-0.6B at 4 bits 9.3 ms from 64 rows against 11.8 from 128 (its
512-token prompt 9.4 against 12.3 ms). So the threshold is 64, the padded size of a step with
a prefill chunk. Fewer rows keep MLX's kernel, which costs the host less there (a product of
1 to 16 rows of Qwen3-0.6B's qkv took 21-22 us against 30-42 dequantized,
`scripts/bench_quantized_products.py`). A decoding step of 64 rows takes the dequantized path
too (moving several times the bytes of its quantized weights); it is not yet measured
against MLX's kernel. Each weight is dequantized only once the product's input is ready
(`mx.depends`), so that one at a time exists: without that the 4-bit Qwen3-4B bench above
peaked at 10.8 GB against 5.8 through MLX's kernel (on the CPU, 20 such products in a row
peaked at 82.5 MiB without it and 19.5 with it, 4 MiB a dequantized weight). The swap is
made when an engine starts on a CUDA GPU (`use_dequantizing_products`). On a Mac, MLX's Metal
kernels for quantized products are another matter, not measured here; on the CPU, in float32
(GGUF's compute dtype there), the quantized product is about as fast as the dequantized one
(64 rows of a 1,024 x 4,096 4-bit weight: 233 against 224 ms, 2-core x86).

Plain layers: width-one convolutions (off)
------------------------------------------
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
    """Make every plain nn.Linear of `model` (quantized layers and subclasses stay) a
    ConvLinear. Returns how many changed."""
    return _change_class(model, nn.Linear, ConvLinear)


def _change_class(model: nn.Module, old: type, new: type) -> int:
    """Give every module of `model` whose class is exactly `old` the class `new`, a subclass
    that only changes how it computes: the same objects, so their arrays, settings and
    frozen state stay. Returns how many changed."""
    changed = 0
    for module in model.modules():
        if type(module) is old:
            module.__class__ = new
            changed += 1
    return changed


# On a CUDA GPU, products of at least this many rows through a quantized layer dequantize its
# weight first and multiply it as a plain matrix (None: never). See the module's docstring.
# Read when a compiled piece is traced (once per shape), so it is set before an engine starts.
DEQUANTIZE_FROM_ROWS: int | None = 64


class DequantizingLinear(nn.QuantizedLinear):
    """nn.QuantizedLinear whose products of at least DEQUANTIZE_FROM_ROWS rows (a prefill
    chunk) dequantize the weight into the activations' dtype and multiply it through the
    back-end's dense product; fewer rows keep MLX's quantized kernel. The dequantized weight
    lives only for that product."""

    def __call__(self, x: mx.array) -> mx.array:
        if DEQUANTIZE_FROM_ROWS is None or math.prod(x.shape[:-1]) < DEQUANTIZE_FROM_ROWS:
            return super().__call__(x)
        # Dequantized once x is ready, just before its product: otherwise MLX may dequantize
        # every layer's weight up front and hold them all at once.
        (quantized,) = mx.depends([self["weight"]], [x])
        weight = mx.dequantize(quantized, self["scales"], self.get("biases"), group_size=self.group_size,
                               bits=self.bits, mode=self.mode, dtype=x.dtype)
        y = x @ weight.T
        return y + self["bias"] if "bias" in self else y


def use_dequantizing_products(model: nn.Module) -> int:
    """Make every nn.QuantizedLinear of `model` a DequantizingLinear. Returns how many changed."""
    return _change_class(model, nn.QuantizedLinear, DequantizingLinear)
