"""Pack integer codes into the uint32 words of MLX's affine quantized layout.

MLX stores each row's codes as one little-endian bit stream: element j occupies bits
[bits * j, bits * (j + 1)) of the row, so for bits 3, 5 and 6 a code can straddle two words.
Checked against ``mx.quantize`` for bits 2, 3, 4, 5, 6 and 8 (tests/test_gguf.py).
MLX only runs on little-endian hosts, so the byte stream is viewed as ``<u4`` words directly.
"""

from __future__ import annotations

import numpy as np

MLX_BITS = (2, 3, 4, 5, 6, 8)


def pack_codes(codes: np.ndarray, bits: int) -> np.ndarray:
    """uint8 codes [rows, cols] (each < 2**bits) -> uint32 [rows, cols * bits / 32].

    Eight codes always fill exactly ``bits`` bytes, so each run of eight is assembled in one
    uint64 and its low ``bits`` bytes are kept: whole-array numpy, no loop over the data.
    """
    if bits not in MLX_BITS:
        raise ValueError(f"MLX has no {bits}-bit quantization (supported: {MLX_BITS})")
    rows, cols = codes.shape
    if cols * bits % 32:
        raise ValueError(f"{cols} columns of {bits}-bit codes do not fill whole uint32 words")
    if bits == 8:
        return np.ascontiguousarray(codes, dtype=np.uint8).view("<u4")
    runs = codes.reshape(rows, -1, 8)
    word = np.zeros(runs.shape[:2], dtype=np.uint64)
    for k in range(8):  # over the eight positions of a run, not over the data
        word |= runs[..., k].astype(np.uint64) << np.uint64(bits * k)
    stream = word.view(np.uint8).reshape(rows, -1, 8)[..., :bits]
    return np.ascontiguousarray(stream).reshape(rows, -1).view("<u4")
