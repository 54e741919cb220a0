"""One GGUF tensor -> MLX arrays: float tensors as they are, quantized ones in MLX's affine
quantized layout (``weight`` uint32 codes, ``scales``, ``biases``; value = code * scale + bias).

Modes (``GGUF_MODES``):

- ``exact`` (default): each block type keeps llama.cpp's integer codes in an MLX group of 32,
  so ``mx.dequantize`` gives llama.cpp's values: Q8_0 -> 8-bit; Q4_0, Q4_1, Q4_K -> 4-bit;
  Q5_0, Q5_1, Q5_K -> 5-bit. Q3_K and Q6_K (16-value sub-blocks) become 8-bit groups of 32:
  exact for Q3_K; for Q6_K, the larger-scaled sub-block of each pair exact and the other within
  an eighth of that one's step (``requant.py`` says why).
- ``native-q4``: every quantized tensor re-quantized to MLX 4-bit groups of 64 (``requant.py``).

Scales and biases are stored in the model's dtype, float32 or float16:
- float32 holds every GGUF scale and bias exactly (a float16 d or dmin times a sub-block scale
  of at most 8 bits), and then ``mx.dequantize`` equals ``gguf.quants.dequantize`` bit for bit
  (Q6_K: as ``requant.py`` states).
- float16 holds the block types' own scales (d, m, -8d, -16d, -128d) and Q3_K's exactly, but
  rounds K-quant scales d*sc and biases dmin*m (and Q6_K's re-derived ones) to 11 significant
  bits: at most 2**-11 of |scale * code| + |bias| per value (measured in the README). bfloat16 would round every type (8 bits) and is
  refused. A bias beyond float16's range is reported rather than stored as inf.

Conversion is whole-array numpy on the memory-mapped block bytes, a few million values at a
time to bound the temporary memory (no loop over blocks). A 3-D tensor (stacked experts,
[experts, rows, cols]) is converted as its [experts * rows, cols] matrix and given back 3-D.

``columns`` reorders a matrix's columns (input features) on the way, for files whose layout
permutes them (qwen35's ``ssm_out``): float and native-q4 tensors take any order; in exact mode
a quantized tensor keeps its codes when the order moves whole groups of 32, and otherwise
becomes a float tensor of its exact values (never a lossy re-quantization).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import mlx.core as mx
import numpy as np
from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as T

from . import GGUF_MODES
from .gguf_blocks import DECODERS, Affine32, Signed16, decode_blocks
from .gguf_metadata import GGUFTensor
from .mlx_pack import pack_codes
from .requant import NATIVE_BITS, NATIVE_GROUP, native_q4, signed16_to_8bit

GROUP_SIZE = 32  # exact mode: every block or sub-block pair is one MLX group of 32
_CHUNK_VALUES = 1 << 22  # values converted at a time (~4M: tens of MB of temporaries)
_FLOAT_TYPES = (T.F32, T.F16, T.BF16)


class UnsupportedGGUF(ValueError):
    """A GGUF file uses something (tensor type, architecture, RoPE variant) we cannot load."""


@dataclass
class MLXTensor:
    """A converted tensor: ``{"weight"}`` (float) or ``{"weight", "scales", "biases"}``."""

    arrays: dict[str, mx.array]
    bits: int | None = None  # None for float tensors
    group_size: int | None = None


@dataclass
class Placement:
    """Where one GGUF tensor goes in the model and what must be undone on the way."""

    module: str  # e.g. "model.layers.0.linear_attn.in_proj_qkv"
    leaf: str = "weight"  # parameter name when the tensor is not quantized
    rows: np.ndarray | None = None  # file rows to take, in model order
    columns: np.ndarray | None = None  # file columns to take, in model order
    force_float: bool = False  # a parameter MLX cannot hold quantized
    transform: Callable[[np.ndarray], np.ndarray] | None = None  # on float32 values
    split: tuple[str, ...] = field(default_factory=tuple)  # modules of equal row blocks


def apply_placement(placement: Placement, arrays: dict[str, mx.array]) -> dict[str, mx.array]:
    """Rows and transform of ``placement`` on converted arrays (float: {"weight"};
    quantized: {"weight", "scales", "biases"}, rows are independent in all three). A transform
    gets float32 values (the caller converts such tensors in float32) and gives float32."""
    if placement.rows is not None:
        rows = mx.array(placement.rows)
        arrays = {k: v[rows] for k, v in arrays.items()}
    if placement.transform is not None:
        values = placement.transform(np.array(arrays["weight"].astype(mx.float32)))
        arrays = {"weight": mx.array(np.asarray(values, dtype=np.float32))}
    return arrays


def supported_types() -> list[str]:
    return [t.name for t in (*_FLOAT_TYPES, *DECODERS)]


def check_dtype(dtype: mx.Dtype) -> None:
    if dtype not in (mx.float16, mx.float32):
        name = str(dtype).rsplit(".", 1)[-1]  # "bfloat16", as --dtype names it (not mlx.core.bfloat16)
        raise ValueError(f"a GGUF file loads as float16 or float32, not {name} "
                         "(GGUF block scales are float16 values that bfloat16 would round)")


def convert_tensor(tensor: GGUFTensor, dtype: mx.Dtype = mx.float16, mode: str = "exact",
                   columns: np.ndarray | None = None, force_float: bool = False) -> MLXTensor:
    """Convert one GGUF tensor, rows in file order, columns in file order or taken in the
    order ``columns`` gives. ``force_float``: a quantized tensor becomes a float tensor of its
    exact values (for parameters MLX cannot hold quantized). Raises UnsupportedGGUF, in one line
    naming the tensor and its type, for types we cannot load."""
    check_dtype(dtype)
    if mode not in GGUF_MODES:
        raise ValueError(f"unknown GGUF mode {mode!r} (use one of {', '.join(GGUF_MODES)})")
    kind = tensor.tensor_type
    if kind not in _FLOAT_TYPES and kind not in DECODERS:  # (first: whatever else is wrong, this decides)
        raise UnsupportedGGUF(
            f"tensor {tensor.name!r} has GGUF type {kind.name}, which mlxserve cannot load "
            f"(supported: {', '.join(supported_types())}); use a Q3_K or higher quantization")
    if 0 in tensor.shape:  # (numpy's "cannot reshape array of size 0 into shape (0)", naming nothing)
        raise UnsupportedGGUF(f"tensor {tensor.name!r} ({kind.name}) has the empty shape {list(tensor.shape)}: "
                              "a dimension of 0 holds no weights")
    if kind in _FLOAT_TYPES:
        values = _float_array(tensor)
        if columns is not None:
            values = values[..., mx.array(columns)]
        return MLXTensor({"weight": values.astype(dtype)})
    block = GGML_QUANT_SIZES[kind][0]
    if tensor.shape[0] % block:  # (llama.cpp refuses such a file too)
        raise UnsupportedGGUF(f"tensor {tensor.name!r} ({kind.name}) has rows of {tensor.shape[0]} values, not a "
                              f"whole number of {kind.name}'s {block}-value blocks: the file is damaged")
    if tensor.data.ndim not in (2, 3):
        raise UnsupportedGGUF(f"tensor {tensor.name!r} ({kind.name}) has {tensor.data.ndim} "
                              "dimensions; only matrices and stacks of them are quantized")
    lead = tensor.data.shape[:-2]  # (experts,) for a 3-D tensor
    converted = _convert_matrix(tensor, tensor.data.reshape(-1, tensor.data.shape[-1]),
                                dtype, mode, columns, force_float)
    if lead:
        converted.arrays = {k: v.reshape(*lead, -1, v.shape[-1])
                            for k, v in converted.arrays.items()}
    return converted


def _convert_matrix(tensor: GGUFTensor, data: np.ndarray, dtype: mx.Dtype, mode: str,
                    columns: np.ndarray | None, force_float: bool) -> MLXTensor:
    """The 2-D block bytes ``data`` of a quantized tensor -> MLXTensor."""
    kind = tensor.tensor_type
    what = f"tensor {tensor.name!r} ({kind.name})"

    def values(chunk: np.ndarray) -> np.ndarray:
        exact = exact_values(kind, chunk)
        return exact if columns is None else exact[:, columns]

    cols = tensor.shape[0]  # GGUF shapes list the fastest-varying dimension first
    if mode == "native-q4" and cols % NATIVE_GROUP == 0 and not force_float:
        parts = [native_q4(values(chunk)) for chunk in _row_chunks(data)]
        weight, scales, biases = (mx.concatenate(p, axis=0) for p in zip(*parts))
        return MLXTensor({"weight": weight, "scales": _cast(scales, dtype, what),
                          "biases": _cast(biases, dtype, what)}, NATIVE_BITS, NATIVE_GROUP)
    group_order = _whole_groups(columns, GROUP_SIZE)
    if force_float or (columns is not None and group_order is None):
        return MLXTensor({"weight": mx.concatenate(
            [mx.array(values(chunk)).astype(dtype) for chunk in _row_chunks(data)])})

    parts = [mlx_affine(kind, chunk) for chunk in _row_chunks(data)]
    if columns is not None:  # whole groups move: codes with them, scales and biases per group
        parts = [Affine32(p.codes[:, columns], p.scales[:, group_order],
                          p.biases[:, group_order], p.bits) for p in parts]
    bits = parts[0].bits
    words = np.concatenate([pack_codes(p.codes, bits) for p in parts])
    scales = np.concatenate([p.scales for p in parts])
    biases = np.concatenate([p.biases for p in parts])
    return MLXTensor({"weight": mx.array(words), "scales": _cast(scales, dtype, what),
                      "biases": _cast(biases, dtype, what)}, bits, GROUP_SIZE)


def _whole_groups(columns: np.ndarray | None, group: int) -> np.ndarray | None:
    """The order of whole groups of ``group`` columns that ``columns`` amounts to, or None when
    it splits a group (or there is no reordering)."""
    if columns is None or len(columns) % group:
        return None
    runs = np.asarray(columns).reshape(-1, group)
    starts = runs[:, 0]
    if np.any(starts % group) or np.any(runs != starts[:, None] + np.arange(group)):
        return None
    return starts // group


def mlx_affine(kind: T, raw: np.ndarray) -> Affine32:
    """Block bytes -> codes, scales and biases of MLX groups of 32 (exact mode's form)."""
    blocks = decode_blocks(kind, raw)
    return signed16_to_8bit(blocks) if isinstance(blocks, Signed16) else blocks


def exact_values(kind: T, raw: np.ndarray) -> np.ndarray:
    """Block bytes -> float32 values, equal to ``gguf.quants.dequantize``'s."""
    return decode_blocks(kind, raw).values()


def _row_chunks(data: np.ndarray):
    values_per_row = max(1, data.size // max(1, data.shape[0]))  # bytes ~ values, within 4x
    step = max(1, _CHUNK_VALUES // values_per_row)
    for start in range(0, data.shape[0], step):
        yield data[start:start + step]


def _float_array(tensor: GGUFTensor) -> mx.array:
    if tensor.tensor_type == T.BF16:  # the reader hands BF16 over as raw bytes
        return mx.array(tensor.data.view("<u2")).view(mx.bfloat16)
    return mx.array(tensor.data)


def _cast(values: np.ndarray | mx.array, dtype: mx.Dtype, what: str) -> mx.array:
    """Scales / biases -> ``dtype``; refuse instead of storing inf."""
    values = mx.array(values)
    cast = values.astype(dtype)
    if not mx.all(mx.isfinite(cast)).item():
        if not mx.all(mx.isfinite(values.astype(mx.float32))).item():  # (float32 would not help)
            raise ValueError(f"a scale or bias of {what} is not a finite number (inf or NaN): "
                             "the file is damaged")
        raise ValueError(f"a scale or bias of {what} overflows {dtype}; "
                         "load with dtype=mx.float32 (--dtype float32)")
    return cast
