"""Re-quantization for the GGUF blocks MLX cannot hold as they are, and for native-q4 mode.

16-value sub-blocks (Q3_K, Q6_K) -> MLX 8-bit groups of 32
---------------------------------------------------------
MLX's quantized kernels take groups of 32, 64 or 128 values (``mx.quantized_matmul`` refuses
16), and a group of 32 here spans two sub-blocks with their own scales. Both types store
value = d * sc * q with integers sc (per 16 values) and q, so a group holds d times integers
p = sc * q. Per group, with sc_big the sub-block scale of larger magnitude:

- when every sign(sc_big) * p fits [-128, 127], the group is stored as it is: scale
  d * sign(sc_big), bias -128 * scale, code p * sign(sc_big) + 128. EXACT for every value, and in
  float16 too (d and 128d are float16 numbers). Always the case for Q3_K (|sc| <= 32 and q in
  [-4, 3] give p in [-124, 128], and +128 only under a negative sc_big); for Q6_K only when the
  scales are tiny.
- otherwise (Q6_K: |sc| <= 128, q in [-32, 31], so p needs 13 bits) the unit is the larger
  sub-block's step over k: scale S = d * sc_big / k, k the largest integer (at least 4) with
  k * span <= 255 codes, bias -offset * S. The larger-scaled sub-block is exact (codes k * q +
  offset; to float32 rounding of S, which is exact when k is a power of two) and the other one
  is rounded to the nearest multiple of S: error <= S / 2 <= an eighth of the larger step.
  The rare group whose values span a full 64 steps takes k = 255/64 and no value is exact.

Measured on the 12 Q6_K tensors of qwen2.5-coder-0.5b-instruct-q4_k_m.gguf (README, "GGUF"):
against ``mx.quantize`` at 8 bits (min/max per group of 32), 53 % of values exact instead of
10 %, mean error 0.039 of a Q6_K step instead of 0.062, RMS 0.18 of Q6_K's own rounding noise
instead of 0.24, max error 4 % higher (its step is finer in groups whose span leaves k just
under the next integer); far closer than 6 bits; the cost per weight of MLX's 8-bit kernels.
Alternatives considered: two 6-bit matrices with the other sub-block zeroed (exact, but twice
the matmuls), float16 (2 bytes a weight, still rounds values, and MLX's CPU back-end runs
float16 matmuls ~40x slower).

native-q4 mode
--------------
Every quantized tensor is re-quantized from its exact GGUF values to MLX 4-bit groups of 64
(``mx.quantize``: round to nearest, scale and bias from each group's min and max), the layout
MLX's fastest kernels use. Lossy: top-1 agreement and KL divergence against exact mode are in
the README. A matrix whose rows are not a multiple of 64 wide keeps its exact form.
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np

from .gguf_blocks import Affine32, Signed16

NATIVE_BITS, NATIVE_GROUP = 4, 64


def signed16_to_8bit(blocks: Signed16) -> Affine32:
    """Merge pairs of 16-value sub-blocks into 8-bit groups of 32 (see the module docstring)."""
    rows = blocks.q.shape[0]
    sc = blocks.sc.reshape(rows, -1, 2).astype(np.int32)  # [rows, groups, 2 sub-blocks]
    sc_big = np.where(np.abs(sc[..., 1]) > np.abs(sc[..., 0]), sc[..., 1], sc[..., 0])
    sign = np.where(sc_big < 0, -1, 1)
    p = (sc[..., None] * blocks.q.reshape(rows, -1, 2, 16)).reshape(rows, -1, 32)  # value / d
    p_min, p_max = p.min(axis=-1), p.max(axis=-1)
    d = np.repeat(blocks.d, 8, axis=-1)  # 8 groups of 32 per super-block of 256

    # As they are, code = sign * p + 128, when that fits 8 bits.
    fits = np.where(sign > 0, (p_min >= -128) & (p_max <= 127), (p_min >= -127) & (p_max <= 128))

    # Otherwise k codes per step of the larger sub-block: code = p * k / sc_big + offset.
    # (float32 is exact enough: |p * k| < 2**19, and a quotient by |sc_big| <= 128 is either a
    # .5 tie exactly or 1/256 away from one.)
    span = np.maximum((p_max - p_min) / np.maximum(np.abs(sc_big), 1), 1)  # in larger steps
    k = np.floor(255 / span)
    k = np.where(k >= 4, k, 255 / span).astype(np.float32)  # a full 64-step span: not integer
    steps = np.rint(p.astype(np.float32) * k[..., None] / np.where(sc_big == 0, 1, sc_big)[
        ..., None].astype(np.float32))
    low, high = steps.min(axis=-1), steps.max(axis=-1)
    # An offset that is a multiple of k, where there is room, keeps the larger sub-block's codes
    # multiples of k: for k = 4, scale * code and the bias are then exact in float32 too.
    aligned = k * np.ceil(-low / k)
    offset = np.where((k >= 4) & (high + aligned <= 255), aligned, -low)
    shifted = np.clip(steps + offset[..., None], 0, 255)  # (clip: rounding ties at both ends)

    codes = np.where(fits[..., None], sign[..., None] * p + 128, shifted).astype(np.uint8)
    scales = np.where(fits, d * sign, d * (sc_big / k.astype(np.float64))).astype(np.float32)
    biases = (np.where(fits, -128.0, -offset.astype(np.float64)) * scales).astype(np.float32)
    return Affine32(codes.reshape(rows, -1), scales, biases, 8)


def native_q4(values: np.ndarray) -> tuple[mx.array, mx.array, mx.array]:
    """float32 values [rows, cols] -> MLX 4-bit group-64 (weight, scales, biases), float32."""
    return mx.quantize(mx.array(values), group_size=NATIVE_GROUP, bits=NATIVE_BITS)
