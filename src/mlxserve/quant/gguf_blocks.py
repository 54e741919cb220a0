"""Decode GGUF quantized blocks into integer codes and per-block scales, with whole-array numpy.

Two shapes come out, after what MLX can hold:

- ``Affine32`` for types whose blocks (or K-quant sub-blocks) have 32 values: one MLX group
  each. Value = code * scale + bias with unsigned ``bits``-bit codes:
  Q8_0 (8-bit, bias -128d on codes q+128), Q4_0 (bias -8d), Q4_1 (bias m), Q5_0 (bias -16d),
  Q5_1 (bias m), Q4_K and Q5_K (scale d*sc, bias -dmin*m per 32-value sub-block).
- ``Signed16`` for the K-quants with 16-value sub-blocks and no minimum, Q3_K and Q6_K:
  value = d * sc * q with signed integer sc (per 16 values) and q. MLX has no group of 16, so
  these are turned into 8-bit groups of 32 by ``requant.py``.

Every decoder reads the raw block bytes of a 2-D tensor, ``[rows, bytes per row]`` (a memory
map), and follows the layout of llama.cpp's ggml-quants.c, mirrored by ``gguf.quants``: the
tests pack blocks from known codes and check both against ``gguf.quants.dequantize``.
``values()`` rebuilds the float32 numbers that ``gguf.quants.dequantize`` returns, bit for bit
(``scale * code`` is exact in float32 for every type here, so there is one rounding, as there).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from gguf import GGMLQuantizationType as T


@dataclass
class Affine32:
    """Element j of a row = codes[j] * scales[j // 32] + biases[j // 32]."""

    codes: np.ndarray  # uint8 [rows, cols], each < 2**bits
    scales: np.ndarray  # float32 [rows, cols / 32]
    biases: np.ndarray  # float32 [rows, cols / 32]
    bits: int

    def values(self) -> np.ndarray:
        rows = self.codes.shape[0]
        grouped = self.codes.reshape(rows, -1, 32).astype(np.float32)
        out = grouped * self.scales[..., None] + self.biases[..., None]
        return out.reshape(rows, -1)


@dataclass
class Signed16:
    """Element j of a row = d[j // 256] * sc[j // 16] * q[j]."""

    d: np.ndarray  # float32 [rows, cols / 256], float16 numbers
    sc: np.ndarray  # int16 [rows, cols / 16]
    q: np.ndarray  # int16 [rows, cols]
    q_min: int  # the range q can take, [q_min, q_max]
    q_max: int

    def values(self) -> np.ndarray:
        rows = self.q.shape[0]
        step = np.repeat(self.d, 16, axis=-1) * self.sc.astype(np.float32)  # exact: 11 + 8 bits
        return (step[..., None] * self.q.reshape(rows, -1, 16)).reshape(rows, -1)


def _f32(half: np.ndarray) -> np.ndarray:
    return half.astype(np.float32)


def _rows(blocks: np.ndarray) -> np.ndarray:
    """[rows, blocks, k] -> [rows, blocks * k]."""
    return blocks.reshape(blocks.shape[0], -1)


def _bit_planes(byte_array: np.ndarray, shifts, mask: int) -> np.ndarray:
    """[..., n] bytes -> [..., len(shifts), n]: (byte >> shift) & mask for each shift."""
    shifts = np.asarray(shifts, dtype=np.uint8)[:, None]
    return (byte_array[..., None, :] >> shifts) & np.uint8(mask)


# --- blocks of 32 ---------------------------------------------------------------------------

_Q8_0 = np.dtype([("d", "<f2"), ("qs", "i1", 32)])
_Q4_0 = np.dtype([("d", "<f2"), ("qs", "u1", 16)])
_Q4_1 = np.dtype([("d", "<f2"), ("m", "<f2"), ("qs", "u1", 16)])
_Q5_0 = np.dtype([("d", "<f2"), ("qh", "<u4"), ("qs", "u1", 16)])
_Q5_1 = np.dtype([("d", "<f2"), ("m", "<f2"), ("qh", "<u4"), ("qs", "u1", 16)])


def _nibbles(qs: np.ndarray) -> np.ndarray:
    """[rows, blocks, 16] bytes -> [rows, blocks, 32]: element i of a block is the low nibble of
    byte i, element i + 16 the high nibble."""
    return np.concatenate([qs & 0x0F, qs >> 4], axis=-1)


def _fifth_bits(qh: np.ndarray) -> np.ndarray:
    """[rows, blocks] little-endian uint32 -> [rows, blocks, 32] uint8: bit i of qh is
    element i's bit 4."""
    qh_bytes = np.ascontiguousarray(qh).view(np.uint8).reshape(*qh.shape, 4)
    return np.unpackbits(qh_bytes, axis=-1, bitorder="little") << 4


def _q8_0(raw: np.ndarray) -> Affine32:
    b = raw.view(_Q8_0)
    d = _f32(b["d"])
    # value = d * q with q int8; MLX codes are unsigned: store q + 128 and fold -128d into bias.
    return Affine32(_rows(b["qs"].view(np.uint8) ^ 0x80), d, -128.0 * d, 8)  # xor 0x80 = q + 128


def _q4_0(raw: np.ndarray) -> Affine32:
    b = raw.view(_Q4_0)
    d = _f32(b["d"])
    return Affine32(_rows(_nibbles(b["qs"])), d, -8.0 * d, 4)  # d * (q - 8)


def _q4_1(raw: np.ndarray) -> Affine32:
    b = raw.view(_Q4_1)
    return Affine32(_rows(_nibbles(b["qs"])), _f32(b["d"]), _f32(b["m"]), 4)  # d * q + m


def _q5_0(raw: np.ndarray) -> Affine32:
    b = raw.view(_Q5_0)
    d = _f32(b["d"])
    codes = _nibbles(b["qs"]) | _fifth_bits(b["qh"])
    return Affine32(_rows(codes), d, -16.0 * d, 5)  # d * (q - 16)


def _q5_1(raw: np.ndarray) -> Affine32:
    b = raw.view(_Q5_1)
    codes = _nibbles(b["qs"]) | _fifth_bits(b["qh"])
    return Affine32(_rows(codes), _f32(b["d"]), _f32(b["m"]), 5)  # d * q + m


# --- K-quants: super-blocks of 256 ----------------------------------------------------------

_Q4_K = np.dtype([("d", "<f2"), ("dmin", "<f2"), ("scales", "u1", 12), ("qs", "u1", 128)])
_Q5_K = np.dtype([("d", "<f2"), ("dmin", "<f2"), ("scales", "u1", 12), ("qh", "u1", 32),
                  ("qs", "u1", 128)])
_Q6_K = np.dtype([("ql", "u1", 128), ("qh", "u1", 64), ("scales", "i1", 16), ("d", "<f2")])
_Q3_K = np.dtype([("hmask", "u1", 32), ("qs", "u1", 64), ("scales", "u1", 12), ("d", "<f2")])


def _k_scale_min(packed: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Q4_K / Q5_K: 12 bytes -> eight 6-bit scales and eight 6-bit minimums.
    Bytes 0-3 hold scales 0-3 (low 6 bits) and the top 2 bits of scales 4-7; bytes 4-7 the same
    for minimums; bytes 8-11 the low 4 bits of scale 4+i (low nibble) and minimum 4+i (high)."""
    sc_lo, m_lo, mixed = packed[..., 0:4], packed[..., 4:8], packed[..., 8:12]
    sc = np.concatenate([sc_lo & 63, (mixed & 15) | ((sc_lo >> 2) & 48)], axis=-1)
    m = np.concatenate([m_lo & 63, (mixed >> 4) | ((m_lo >> 2) & 48)], axis=-1)
    return sc, m


def _k_low_nibbles(qs: np.ndarray) -> np.ndarray:
    """Q4_K / Q5_K: [rows, supers, 128] -> [rows, supers, 256]: each 32 bytes hold 64 values,
    the first 32 in the low nibbles, the next 32 in the high ones."""
    planes = _bit_planes(qs.reshape(*qs.shape[:-1], 4, 32), (0, 4), 0x0F)  # [.., 4, 2, 32]
    return planes.reshape(*qs.shape[:-1], 256)


def _k_affine(b: np.ndarray, codes: np.ndarray, bits: int) -> Affine32:
    sc, m = _k_scale_min(b["scales"])
    scales = _f32(b["d"])[..., None] * sc  # float16 * 6-bit integer: exact in float32
    biases = -(_f32(b["dmin"])[..., None] * m)
    return Affine32(_rows(codes), _rows(scales), _rows(biases), bits)


def _q4_k(raw: np.ndarray) -> Affine32:
    b = raw.view(_Q4_K)
    return _k_affine(b, _k_low_nibbles(b["qs"]), 4)  # (d * sc) * q - dmin * m


def _q5_k(raw: np.ndarray) -> Affine32:
    b = raw.view(_Q5_K)
    high = _bit_planes(b["qh"], range(8), 1).reshape(*b.shape, 256)  # bit i of qh[l]: 32i + l
    return _k_affine(b, _k_low_nibbles(b["qs"]) | (high << 4), 5)


def _q6_k(raw: np.ndarray) -> Signed16:
    b = raw.view(_Q6_K)
    shape = b.shape
    # Each half of 128 values: ql[64h + l] holds value 128h + l (low nibble) and 128h + 64 + l
    # (high nibble); qh[32h + l] holds the top 2 bits of values 128h + 32s + l at bits 2s.
    low = _bit_planes(b["ql"].reshape(*shape, 2, 64), (0, 4), 0x0F).reshape(*shape, 256)
    high = _bit_planes(b["qh"].reshape(*shape, 2, 32), (0, 2, 4, 6), 3).reshape(*shape, 256)
    q = (low | (high << 4)).astype(np.int16) - 32
    return Signed16(_f32(b["d"]), _rows(b["scales"].astype(np.int16)), _rows(q), -32, 31)


def _q3_k(raw: np.ndarray) -> Signed16:
    b = raw.view(_Q3_K)
    shape = b.shape
    packed = b["scales"]
    # 16 six-bit scales: low nibbles of bytes 0-7 then their high nibbles, plus 2 top bits
    # from bytes 8-11 (scale 4k + i in bits 2k of byte 8 + i); stored with an offset of 32.
    low = _bit_planes(packed[..., :8], (0, 4), 0x0F).reshape(*shape, 16)
    top = _bit_planes(packed[..., 8:], (0, 2, 4, 6), 3).reshape(*shape, 16)
    sc = (low | (top << 4)).astype(np.int16) - 32
    # Values 128h + 32k + l: 2 low bits at bits 2k of qs[32h + l], and hmask[l] bit (4h + k)
    # set means no -4 offset.
    q2 = _bit_planes(b["qs"].reshape(*shape, 2, 32), (0, 2, 4, 6), 3).reshape(*shape, 256)
    h = _bit_planes(b["hmask"], range(8), 1).reshape(*shape, 256)
    q = q2.astype(np.int16) - 4 * (1 - h.astype(np.int16))
    return Signed16(_f32(b["d"]), _rows(sc), _rows(q), -4, 3)


DECODERS: dict[T, Callable[[np.ndarray], Affine32 | Signed16]] = {
    T.Q8_0: _q8_0, T.Q4_0: _q4_0, T.Q4_1: _q4_1, T.Q5_0: _q5_0, T.Q5_1: _q5_1,
    T.Q4_K: _q4_k, T.Q5_K: _q5_k, T.Q6_K: _q6_k, T.Q3_K: _q3_k,
}


def decode_blocks(kind: T, raw: np.ndarray) -> Affine32 | Signed16:
    """Decode the raw bytes [rows, bytes per row] of a tensor of a type in ``DECODERS``."""
    return DECODERS[kind](raw)
