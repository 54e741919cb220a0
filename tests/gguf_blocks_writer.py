"""Write GGUF blocks from chosen integer codes and scales, as llama.cpp's quantizers lay them out.

``gguf.quants.quantize`` cannot write K-quants, so tests build their blocks here, from fields
they choose, and check the bytes with ``gguf.quants.dequantize`` before using them. The byte
layouts follow ggml-quants.c's ``quantize_row_*_ref`` functions; this is written independently
of ``mlxserve.quant.gguf_blocks`` (which reads them) so that a shared mistake cannot hide.

Every writer makes ``n`` blocks of random fields, with extreme values included, and super-block
scales d (and dmin) of magnitude 10**log10_d.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from gguf import GGMLQuantizationType as T


def _half_bytes(x: np.ndarray) -> np.ndarray:
    return np.asarray(x, dtype=np.float16).reshape(-1, 1).view(np.uint8)


@dataclass
class Fields:
    """The integer fields of n blocks and the values they encode (float64, exact)."""

    blocks: np.ndarray  # uint8 [n, block bytes]
    codes: np.ndarray  # int [n, values per block]: the stored (unsigned) code of each value
    values: np.ndarray  # float64 [n, values per block]
    d: np.ndarray  # float16 [n]: the super-block scale
    sc: np.ndarray  # int [n, sub-blocks]: the sub-block scales


def q4_k(rng, n: int, log10_d=(-5, -1)) -> Fields:
    """value = d * sc[j // 32] * q - dmin * m[j // 32]; q 4-bit, sc and m 6-bit."""
    d, dmin = _random_halves(rng, n, log10_d), _random_halves(rng, n, log10_d)
    sc, m = rng.integers(0, 64, (n, 8)), rng.integers(0, 64, (n, 8))
    q = rng.integers(0, 16, (n, 256))
    _extremes(sc, m, q, 15)
    scales = _pack_k_scales(sc, m)
    qs = _k_nibbles(q)
    blocks = np.concatenate([_half_bytes(d), _half_bytes(dmin), scales, qs], axis=1)
    return Fields(blocks, q, _k_values(d, dmin, sc, m, q), d, sc)


def q5_k(rng, n: int, log10_d=(-5, -1)) -> Fields:
    """As Q4_K with 5-bit q: the 5th bit of value 32i + l is bit i of qh[l]."""
    d, dmin = _random_halves(rng, n, log10_d), _random_halves(rng, n, log10_d)
    sc, m = rng.integers(0, 64, (n, 8)), rng.integers(0, 64, (n, 8))
    q = rng.integers(0, 32, (n, 256))
    _extremes(sc, m, q, 31)
    high = (q >> 4).reshape(n, 8, 32)
    qh = np.zeros((n, 32), dtype=np.int64)
    for i in range(8):
        qh |= high[:, i, :] << i
    blocks = np.concatenate([_half_bytes(d), _half_bytes(dmin), _pack_k_scales(sc, m),
                             qh.astype(np.uint8), _k_nibbles(q & 15)], axis=1)
    return Fields(blocks, q, _k_values(d, dmin, sc, m, q), d, sc)


def q6_k(rng, n: int, log10_d=(-5, -1), sc: np.ndarray | None = None,
         q: np.ndarray | None = None) -> Fields:
    """value = d * sc[j // 16] * (q - 32); q 6-bit, sc int8 (random unless given)."""
    d = _random_halves(rng, n, log10_d)
    if sc is None:
        sc = rng.integers(-128, 128, (n, 16))
    if q is None:
        q = rng.integers(0, 64, (n, 256))
        q[:, 0], q[:, 17] = 0, 63
    ql = np.zeros((n, 128), dtype=np.int64)
    qh = np.zeros((n, 64), dtype=np.int64)
    for half in range(2):
        chunk = q[:, 128 * half:128 * (half + 1)]
        ql[:, 64 * half:64 * half + 64] = (chunk[:, :64] & 15) | ((chunk[:, 64:] & 15) << 4)
        for s in range(4):
            qh[:, 32 * half:32 * half + 32] |= (chunk[:, 32 * s:32 * s + 32] >> 4) << (2 * s)
    blocks = np.concatenate([ql.astype(np.uint8), qh.astype(np.uint8),
                             sc.astype(np.int8).view(np.uint8), _half_bytes(d)], axis=1)
    values = (d.astype(np.float64)[:, None] * np.repeat(sc, 16, axis=1) * (q - 32))
    return Fields(blocks, q, values, d, sc)


def q3_k(rng, n: int, log10_d=(-5, -1)) -> Fields:
    """value = d * sc[j // 16] * (q - 4); q 3-bit (2 bits in qs, 1 in hmask), sc 6-bit - 32."""
    d = _random_halves(rng, n, log10_d)
    sc = rng.integers(-32, 32, (n, 16))
    sc[:, 0], sc[:, 1] = -32, 31
    q = rng.integers(0, 8, (n, 256))
    q[:, 0], q[:, 1] = 0, 7
    hmask = np.zeros((n, 32), dtype=np.int64)
    for k in range(8):
        hmask |= (q[:, 32 * k:32 * k + 32] >> 2) << k
    low = q & 3
    qs = np.zeros((n, 64), dtype=np.int64)
    for half in range(2):
        chunk = low[:, 128 * half:128 * (half + 1)]
        for s in range(4):
            qs[:, 32 * half:32 * half + 32] |= chunk[:, 32 * s:32 * s + 32] << (2 * s)
    stored = sc + 32
    scales = np.zeros((n, 12), dtype=np.int64)
    for j in range(16):
        scales[:, j % 8] |= (stored[:, j] & 15) << (4 * (j // 8))
        scales[:, 8 + j % 4] |= (stored[:, j] >> 4) << (2 * (j // 4))
    blocks = np.concatenate([hmask.astype(np.uint8), qs.astype(np.uint8),
                             scales.astype(np.uint8), _half_bytes(d)], axis=1)
    values = d.astype(np.float64)[:, None] * np.repeat(sc, 16, axis=1) * (q - 4)
    return Fields(blocks, q, values, d, sc)


WRITERS = {T.Q4_K: q4_k, T.Q5_K: q5_k, T.Q6_K: q6_k, T.Q3_K: q3_k}


def _random_halves(rng, n: int, log10_d) -> np.ndarray:
    """float16 scales of magnitude 10**log10_d (a range), a quarter of them negative."""
    return (10.0 ** rng.uniform(*log10_d, n) * rng.choice([1, 1, 1, -1], n)).astype(np.float16)


def _extremes(sc, m, q, top) -> None:
    """Make sure the extreme fields occur: 6-bit 63 and 0, codes 0 and top."""
    sc[:, 0], sc[:, 1], m[:, 0], m[:, 2] = 63, 0, 63, 0
    q[:, 0], q[:, 1] = 0, top


def _pack_k_scales(sc: np.ndarray, m: np.ndarray) -> np.ndarray:
    """Eight 6-bit scales and minimums -> 12 bytes (quantize_row_q4_K_ref's packing)."""
    out = np.zeros((sc.shape[0], 12), dtype=np.int64)
    for j in range(4):
        out[:, j] = sc[:, j] | ((sc[:, j + 4] >> 4) << 6)
        out[:, j + 4] = m[:, j] | ((m[:, j + 4] >> 4) << 6)
        out[:, j + 8] = (sc[:, j + 4] & 15) | ((m[:, j + 4] & 15) << 4)
    return out.astype(np.uint8)


def _k_nibbles(q: np.ndarray) -> np.ndarray:
    """256 4-bit codes -> 128 bytes: byte 32j + l = q[64j + l] | q[64j + 32 + l] << 4."""
    chunks = q.reshape(q.shape[0], 4, 2, 32)
    return (chunks[:, :, 0, :] | (chunks[:, :, 1, :] << 4)).reshape(q.shape[0], 128).astype(
        np.uint8)


def _k_values(d, dmin, sc, m, q) -> np.ndarray:
    step = d.astype(np.float64)[:, None] * sc
    low = dmin.astype(np.float64)[:, None] * m
    return np.repeat(step, 32, axis=1) * q - np.repeat(low, 32, axis=1)
