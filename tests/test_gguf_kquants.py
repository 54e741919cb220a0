"""K-quants (Q4_K, Q5_K, Q3_K, Q6_K) and native-q4 mode on blocks the test packs itself.

``gguf.quants.quantize`` cannot write K-quants, so ``gguf_blocks_writer`` packs blocks from
chosen integer fields; each test first checks those bytes with ``gguf.quants.dequantize`` and
then holds our MLX tensors to gguf's values.
"""

from __future__ import annotations

import importlib

import gguf
import gguf_blocks_writer as writer
import mlx.core as mx
import numpy as np
import pytest
from gguf import GGMLQuantizationType as T
from mlx import nn
from tiny_models import llama_cpp_permute, to_gguf_name, write_gguf

from mlxserve.quant.gguf import load_gguf
from mlxserve.quant.gguf_convert import convert_tensor, exact_values
from mlxserve.quant.gguf_metadata import open_gguf

ROWS, SUPERS = 8, 3  # a tensor of 8 rows x 768 columns
FP16_UNIT = 2.0**-11  # float16's unit roundoff (11 significant bits)
FP16_TINY = 2.0**-25  # half float16's smallest subnormal: the absolute rounding floor


def gguf_reference(qtype: T, fields: writer.Fields, rows: int) -> np.ndarray:
    """gguf.quants.dequantize of the test's blocks, after checking that they encode the fields'
    values (float32 adds at most one rounding, of Q4_K/Q5_K's final subtraction)."""
    raw = fields.blocks.reshape(rows, -1)
    reference = gguf.quants.dequantize(raw, qtype)
    np.testing.assert_allclose(reference.reshape(fields.values.shape), fields.values,
                               rtol=2.0**-24, atol=0)
    return reference


def tensor_file(tmp_path, qtype: T, fields: writer.Fields, rows: int):
    path = write_gguf(tmp_path / f"{qtype.name}.gguf", "llama", {},
                      {"blk.0.ffn_down.weight": (fields.blocks.reshape(rows, -1), qtype)})
    return open_gguf(path).tensors[0]


def dequantize(converted, dtype=mx.float32) -> np.ndarray:
    """MLX's dequantization of a converted tensor, scales and biases first cast to ``dtype``."""
    a = converted.arrays
    scales, biases = (a[k].astype(mx.float32) for k in ("scales", "biases"))
    out = mx.dequantize(a["weight"], scales, biases,
                        group_size=converted.group_size, bits=converted.bits)
    return np.array(out.astype(dtype))


def mlx_codes(converted) -> np.ndarray:
    """Let MLX unpack our words: dequantize with scale 1, bias 0."""
    ones = mx.ones(converted.arrays["scales"].shape, dtype=mx.float32)
    codes = mx.dequantize(converted.arrays["weight"], ones, mx.zeros_like(ones),
                          group_size=converted.group_size, bits=converted.bits)
    return np.array(codes).astype(np.int64)


def larger_scale(sc: np.ndarray) -> np.ndarray:
    """Per pair of 16-value sub-blocks (one MLX group), the scale of larger magnitude."""
    pairs = sc.reshape(*sc.shape[:-1], -1, 2)
    return np.where(np.abs(pairs[..., 1]) > np.abs(pairs[..., 0]), pairs[..., 1], pairs[..., 0])


def q3_k_codes(fields: writer.Fields) -> np.ndarray:
    """Q3_K's 8-bit codes by the rule requant.py documents: 128 + sign(sc_big) * sc * (q - 4)."""
    sign = np.sign(larger_scale(fields.sc)) + (larger_scale(fields.sc) == 0)
    scale16 = np.repeat(np.repeat(sign, 2, axis=-1) * fields.sc, 16, axis=-1)
    return 128 + scale16 * (fields.codes - 4)


# --- exact types: bit-identical codes and values -----------------------------------------------

@pytest.mark.parametrize("qtype,bits", [(T.Q4_K, 4), (T.Q5_K, 5), (T.Q3_K, 8)],
                         ids=lambda x: getattr(x, "name", str(x)))
def test_k_quant_is_exact(tmp_path, qtype, bits):
    fields = writer.WRITERS[qtype](np.random.default_rng(bits), ROWS * SUPERS)
    reference = gguf_reference(qtype, fields, ROWS)
    tensor = tensor_file(tmp_path, qtype, fields, ROWS)

    exact = convert_tensor(tensor, mx.float32)
    assert (exact.bits, exact.group_size) == (bits, 32)
    assert exact.arrays["weight"].shape == (ROWS, 256 * SUPERS * bits // 32)
    expected_codes = fields.codes if qtype != T.Q3_K else q3_k_codes(fields)
    assert np.array_equal(mlx_codes(exact), expected_codes.reshape(ROWS, -1))
    assert np.array_equal(dequantize(exact), reference)

    # float16 scales and biases: Q3_K's (d, 128d) are float16 numbers; K-quants' d*sc and
    # dmin*m round to 11 bits, which bounds the error (measured on real tensors in the README).
    half = convert_tensor(tensor, mx.float16)
    assert half.arrays["scales"].dtype == half.arrays["biases"].dtype == mx.float16
    error = np.abs(dequantize(half) - reference)
    if qtype == T.Q3_K:
        assert error.max() == 0
        return
    code = mlx_codes(exact).reshape(ROWS, -1, 32)
    scales, biases = (np.array(exact.arrays[k])[..., None] for k in ("scales", "biases"))
    bound = (FP16_UNIT * (np.abs(scales) * code + np.abs(biases)) + FP16_TINY * (code + 1)
             + 2.0**-23 * np.abs(reference.reshape(code.shape)))
    assert np.all(error.reshape(code.shape) <= bound)
    print(f"{qtype.name} with float16 scales: max |error| {error.max():.3g}, "
          f"max |error| / bound {np.max(error.reshape(code.shape) / bound):.2f}")


# --- Q6_K: 8-bit groups of 32, bounded error ---------------------------------------------------

def q6_k_scales(rng) -> np.ndarray:
    """Random int8 sub-block scales plus the cases requant.py treats apart: opposite scales (a
    group spanning 64 steps), small scales (stored as they are), equal and zero scales."""
    sc = rng.integers(-128, 128, (ROWS * SUPERS, 16))
    sc[0, :8] = [100, -100, -7, 7, 3, -4, 0, 0]
    sc[1, :8] = [-128, 127, 127, -128, 5, 5, 1, -1]
    return sc


def test_q6_k_error_is_bounded(tmp_path):
    """Groups whose integers sc * q fit 8 bits are exact; the others have a step S of at most a
    quarter of the larger sub-block's step (255/64 of it when the group spans 64 steps), are
    within S/2 of every value, and exact on the larger sub-block when S is a quarter step."""
    rng = np.random.default_rng(6)
    sc = q6_k_scales(rng)
    q = rng.integers(0, 64, (ROWS * SUPERS, 256))
    q[0, 0], q[0, 16], q[0, 17] = 0, 0, 63  # scales 100, -100: values at -32, +32 and -31 steps
    fields = writer.q6_k(rng, ROWS * SUPERS, sc=sc, q=q)
    reference = gguf_reference(T.Q6_K, fields, ROWS)
    converted = convert_tensor(tensor_file(tmp_path, T.Q6_K, fields, ROWS), mx.float32)
    assert (converted.bits, converted.group_size) == (8, 32)

    shape = (ROWS * SUPERS, 8, 2, 16)
    error = np.abs(dequantize(converted) - reference).reshape(shape)
    pairs = sc.reshape(ROWS * SUPERS, 8, 2)
    big = larger_scale(sc)
    d = np.abs(fields.d.astype(np.float64))[:, None]
    sign = (np.sign(big) + (big == 0))[..., None, None]
    as_is = sign * pairs[..., None] * (q.reshape(shape) - 32)
    fits = (as_is.min(axis=(-1, -2)) >= -128) & (as_is.max(axis=(-1, -2)) <= 127)
    step = np.abs(np.array(converted.arrays["scales"])).reshape(fits.shape)  # S per group
    quarter = d * np.abs(big) / 4
    # float32 rounding of scale * code + bias, which can be up to 255 S, when S is not exact
    rounding = 2.0**-23 * (np.abs(reference).reshape(shape) + 256 * step[..., None, None])

    assert fits[0, 2] and fits[0, 3] and np.all(error[fits] == 0)
    assert np.all(step[~fits] <= quarter[~fits] * 64 / 63.75)
    assert np.all(error <= step[..., None, None] / 2 + rounding)
    is_big = np.abs(pairs) == np.abs(big)[..., None]
    assert np.all(error[(step == quarter)[..., None] & is_big] == 0)
    assert step[0, 0] == pytest.approx(quarter[0, 0] * 64 / 255 * 4)  # the 64-step group
    relative = error / np.where(fits, d, step)[..., None, None]
    print(f"Q6_K -> 8-bit g32: exact {np.mean(error == 0):.1%} of values, max |error| "
          f"{relative.max():.2f} S, mean {relative.mean():.3f} S")


# --- native-q4 ---------------------------------------------------------------------------------

@pytest.mark.parametrize("qtype", [T.Q4_K, T.Q5_K, T.Q6_K, T.Q3_K], ids=lambda t: t.name)
def test_native_q4_requantizes_the_exact_values(tmp_path, qtype):
    fields = writer.WRITERS[qtype](np.random.default_rng(4), ROWS * SUPERS)
    reference = gguf_reference(qtype, fields, ROWS)
    assert np.array_equal(exact_values(qtype, fields.blocks.reshape(ROWS, -1)), reference)
    converted = convert_tensor(tensor_file(tmp_path, qtype, fields, ROWS), mx.float32,
                               mode="native-q4")
    assert (converted.bits, converted.group_size) == (4, 64)
    expected = mx.quantize(mx.array(reference), group_size=64, bits=4)
    for key, array in zip(("weight", "scales", "biases"), expected):
        assert np.array_equal(np.array(converted.arrays[key]), np.array(array))


def test_native_q4_keeps_rows_not_a_multiple_of_64_exact(tmp_path):
    w = np.random.default_rng(5).standard_normal((4, 96)).astype(np.float32)
    path = write_gguf(tmp_path / "n.gguf", "llama", {},
                      {"blk.0.ffn_up.weight": (gguf.quants.quantize(w, T.Q8_0), T.Q8_0)})
    converted = convert_tensor(open_gguf(path).tensors[0], mx.float32, mode="native-q4")
    assert (converted.bits, converted.group_size) == (8, 32)


# --- a tiny llama of K-quants, end to end ------------------------------------------------------

H, HEADS, KV_HEADS, FFN, VOCAB, TOKENS = 256, 4, 2, 512, 300, [1, 7, 42, 299, 3, 150, 8, 64]
PLAN = {"q_proj": T.Q4_K, "k_proj": T.Q5_K, "v_proj": T.Q3_K, "o_proj": T.Q4_K,
        "gate_proj": T.Q5_K, "up_proj": T.Q4_K, "down_proj": T.Q6_K}
PARENT = {p: "self_attn" for p in ("q_proj", "k_proj", "v_proj", "o_proj")} | {
    p: "mlp" for p in ("gate_proj", "up_proj", "down_proj")}
LOG10_D = {T.Q4_K: (-4.3, -3.8), T.Q5_K: (-4.6, -4.1), T.Q3_K: (-2.8, -2.3),
           T.Q6_K: (-4.3, -3.8)}


def k_quant_llama(tmp_path):
    """(GGUF path, HF-layout float32 weights holding gguf's values of the same blocks)."""
    rng = np.random.default_rng(9)
    shapes = {"q_proj": (H, H), "k_proj": (KV_HEADS * 64, H), "v_proj": (KV_HEADS * 64, H),
              "o_proj": (H, H), "gate_proj": (FFN, H), "up_proj": (FFN, H), "down_proj": (H, FFN)}
    embed = (0.5 * rng.standard_normal((VOCAB, H))).astype(np.float32)
    norms = {n: (1 + 0.1 * rng.standard_normal(H)).astype(np.float32)
             for n in ("model.norm.weight", "model.layers.0.input_layernorm.weight",
                       "model.layers.0.post_attention_layernorm.weight")}
    tensors = {to_gguf_name(n): (w, T.F32) for n, w in norms.items()}
    tensors["token_embd.weight"] = (embed.astype(np.float16), T.F16)
    hf = {"model.embed_tokens.weight": embed.astype(np.float16).astype(np.float32)} | norms
    for proj, (rows, cols) in shapes.items():
        qtype = PLAN[proj]
        fields = writer.WRITERS[qtype](rng, rows * cols // 256, log10_d=LOG10_D[qtype])
        blocks = fields.blocks.reshape(rows, -1)
        values = gguf.quants.dequantize(blocks, qtype)  # as the file stores them
        name = f"model.layers.0.{PARENT[proj]}.{proj}.weight"
        if proj in ("q_proj", "k_proj"):  # the file holds llama.cpp's permuted rows
            heads = HEADS if proj == "q_proj" else KV_HEADS
            order = llama_cpp_permute(np.arange(rows), heads)
            hf[name] = values[np.argsort(order)]
        else:
            hf[name] = values
        tensors[to_gguf_name(name)] = (blocks, qtype)
    kv = {"llama.block_count": 1, "llama.context_length": 4096, "llama.embedding_length": H,
          "llama.feed_forward_length": FFN, "llama.attention.head_count": HEADS,
          "llama.attention.head_count_kv": KV_HEADS, "llama.rope.freq_base": 10000.0,
          "llama.attention.layer_norm_rms_epsilon": 1e-6,
          "tokenizer.ggml.tokens": [f"t{i}" for i in range(VOCAB)]}
    return write_gguf(tmp_path / "k.gguf", "llama", kv, tensors), hf


def llama_logits(config: dict, weights: list, quantization: dict | None = None) -> np.ndarray:
    module = importlib.import_module("mlx_lm.models.llama")
    model = module.Model(module.ModelArgs.from_dict(config))
    if quantization:
        nn.quantize(model, class_predicate=lambda p, _: quantization.get(p, False))
    model.load_weights(weights)
    return np.array(model(mx.array([TOKENS]))[0].astype(mx.float32))


def test_k_quant_llama_matches_float_reference(tmp_path):
    """Names, row order and quantization settings of K-quant tensors through a whole model.
    gguf's values for every matrix but Q6_K's, whose 8-bit form the reference takes as converted
    (test_q6_k_error_is_bounded holds it to gguf's values): random sub-block scales, unlike
    trained ones, make its rounded half-blocks differ visibly from the Q6_K values."""
    path, hf = k_quant_llama(tmp_path)
    exact = load_gguf(path, mx.float32)
    assert {m.rsplit(".", 1)[1]: (q["bits"], q["group_size"])
            for m, q in exact.quantization.items()} == {
        "q_proj": (4, 32), "k_proj": (5, 32), "v_proj": (8, 32), "o_proj": (4, 32),
        "gate_proj": (5, 32), "up_proj": (4, 32), "down_proj": (8, 32)}
    as_converted = dict(hf)
    down = next(t for t in open_gguf(path).tensors if t.name == "blk.0.ffn_down.weight")
    as_converted["model.layers.0.mlp.down_proj.weight"] = dequantize(
        convert_tensor(down, mx.float32))
    reference = llama_logits(exact.config, [(n, mx.array(w)) for n, w in as_converted.items()])
    assert reference.std() > 1  # logits that tell tokens apart
    ours = llama_logits(exact.config, list(exact.weights.items()), exact.quantization)
    np.testing.assert_allclose(ours, reference, atol=1e-5 * reference.std(), rtol=0)

    # native-q4 re-quantizes gguf's (true) values, Q6_K's included.
    native = load_gguf(path, mx.float32, mode="native-q4")
    assert {(q["bits"], q["group_size"]) for q in native.quantization.values()} == {(4, 64)}
    requantized = {n: np.array(mx.dequantize(*mx.quantize(mx.array(w), group_size=64, bits=4),
                                             group_size=64, bits=4))
                   if n.endswith("proj.weight") else w for n, w in hf.items()}
    expected = llama_logits(native.config, [(n, mx.array(w)) for n, w in requantized.items()])
    got = llama_logits(native.config, list(native.weights.items()), native.quantization)
    np.testing.assert_allclose(got, expected, atol=1e-4 * reference.std(), rtol=0)
