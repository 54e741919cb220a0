"""GGUF loader: exact per-type repacking of the 32-value block types, llama/qwen2/qwen3 end to
end, a real file, refusals. (K-quants: test_gguf_kquants.py; the real Q4_K_M file:
test_gguf_real.py.)

Every tiny GGUF here is written by the test with gguf.GGUFWriter from random weights, and every
expected value comes from the gguf package's own (de)quantizer, not from our loader.
"""

from __future__ import annotations

import importlib
import math
import re
import time
from pathlib import Path

import gguf
import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from gguf import GGMLQuantizationType as T
from mlx_lm.models.rope_utils import initialize_rope

from mlxserve.quant.gguf import UnsupportedGGUF, convert_tensor, load_gguf
from mlxserve.quant.gguf_metadata import open_gguf
from mlxserve.quant.mlx_pack import MLX_BITS, pack_codes
from tiny_models import llama_cpp_permute, to_gguf_name, write_gguf

BITS = {T.Q8_0: 8, T.Q4_0: 4, T.Q4_1: 4, T.Q5_0: 5, T.Q5_1: 5}
BLOCK_BYTES = {T.Q8_0: 34, T.Q4_0: 18, T.Q4_1: 20, T.Q5_0: 22, T.Q5_1: 24}
HEADER_BYTES = {T.Q4_0: 2, T.Q4_1: 4, T.Q5_0: 2, T.Q5_1: 4}  # d (and m) before qh / qs


# --- writing tiny GGUF files ------------------------------------------------------------------

def gguf_codes(stored: np.ndarray, qtype: T) -> np.ndarray:
    """The integer codes of GGUF blocks, read straight from the block bytes, as MLX codes
    (Q8_0's int8 shifted by +128 to be unsigned)."""
    rows = stored.shape[0]
    blocks = stored.reshape(rows, -1, BLOCK_BYTES[qtype])
    if qtype == T.Q8_0:
        return blocks[..., 2:].view(np.int8).astype(np.int32).reshape(rows, -1) + 128
    start = HEADER_BYTES[qtype]
    fifth = np.zeros(blocks.shape[:2] + (32,), dtype=np.int32)
    if qtype in (T.Q5_0, T.Q5_1):  # a little-endian uint32 whose bit i is element i's bit 4
        qh = blocks[..., start:start + 4].astype(np.int64)
        word = qh[..., 0] | qh[..., 1] << 8 | qh[..., 2] << 16 | qh[..., 3] << 24
        fifth = ((word[..., None] >> np.arange(32)) & 1).astype(np.int32) << 4
        start += 4
    qs = blocks[..., start:].astype(np.int32)
    return (np.concatenate([qs & 15, qs >> 4], axis=-1) | fifth).reshape(rows, -1)


def mlx_codes(converted: dict[str, mx.array], bits: int) -> np.ndarray:
    """Let MLX unpack our words: dequantize with scale 1, bias 0."""
    ones = mx.ones(converted["scales"].shape, dtype=mx.float32)
    codes = mx.dequantize(converted["weight"], ones, mx.zeros_like(ones), group_size=32, bits=bits)
    return np.array(codes).astype(np.int32)


def random_matrix(rng, rows=64, cols=256) -> np.ndarray:
    w = (rng.standard_normal((rows, cols)) * 0.1).astype(np.float32)
    w[0, :32] = 0.0  # an all-zero block (d = 0)
    w[1, 5] = 3.0  # an outlier
    w[2, 40:72] = np.linspace(-1, 1, 32)  # a block that spans two groups' worth of range
    return w


# --- 1. each tensor type, exactly -------------------------------------------------------------

@pytest.mark.parametrize("qtype", [T.F32, T.F16, T.BF16, *BITS], ids=lambda t: t.name)
def test_tensor_type_is_exact(tmp_path, qtype):
    stored = gguf.quants.quantize(random_matrix(np.random.default_rng(0)), qtype)
    expected = gguf.quants.dequantize(stored, qtype)
    path = write_gguf(tmp_path / "t.gguf", "llama", {}, {"blk.0.ffn_up.weight": (stored, qtype)})
    tensor = open_gguf(path).tensors[0]

    converted = convert_tensor(tensor, mx.float32)
    out = converted.arrays
    if qtype not in BITS:
        assert set(out) == {"weight"} and converted.bits is None
        assert out["weight"].shape == (64, 256) and out["weight"].dtype == mx.float32
        assert np.array_equal(np.array(out["weight"]), expected)
        return

    bits = BITS[qtype]
    assert (converted.bits, converted.group_size) == (bits, 32)
    assert out["weight"].dtype == mx.uint32 and out["weight"].shape == (64, 256 * bits // 32)
    assert out["scales"].shape == out["biases"].shape == (64, 256 // 32)
    values = mx.dequantize(out["weight"], out["scales"], out["biases"], group_size=32, bits=bits)
    assert np.array_equal(np.array(values), expected)
    assert np.array_equal(mlx_codes(out, bits), gguf_codes(stored, qtype))

    # The float16 default holds the very same scales and biases (they are float16 numbers).
    half = convert_tensor(tensor).arrays
    assert half["scales"].dtype == half["biases"].dtype == mx.float16
    for key in ("scales", "biases"):
        assert np.array_equal(np.array(half[key].astype(mx.float32)), np.array(out[key]))


@pytest.mark.parametrize("qtype", [T.Q8_0, T.Q4_1], ids=lambda t: t.name)
def test_packing_matches_mx_quantize(tmp_path, qtype):
    """Blocks with scale 1 whose codes span the full range: mx.quantize of (code - max code) finds
    scale 1 and bias -max code (it picks a positive scale when the minimum has the larger
    magnitude), so its codes and packed words must equal ours bit for bit."""
    rng = np.random.default_rng(1)
    bits = BITS[qtype]
    codes = rng.integers(0, 2**bits, size=(8, 4, 32), dtype=np.uint8)
    codes[..., 3], codes[..., 20] = 0, 2**bits - 1
    one, zero = np.float16(1).tobytes(), np.float16(0).tobytes()
    if qtype == T.Q8_0:  # d = 1, int8 q = code - 128
        header = np.frombuffer(one, np.uint8)
        body = (codes.astype(np.int16) - 128).astype(np.int8).view(np.uint8)
    else:  # d = 1, m = 0, element i in the low nibble of byte i, element i + 16 in the high one
        header = np.frombuffer(one + zero, np.uint8)
        body = codes[..., :16] | (codes[..., 16:] << 4)
    blocks = np.concatenate([np.broadcast_to(header, (8, 4, header.size)), body], axis=-1)
    path = write_gguf(tmp_path / "p.gguf", "llama", {},
                      {"blk.0.ffn_up.weight": (blocks.reshape(8, -1), qtype)})

    ours = convert_tensor(open_gguf(path).tensors[0], mx.float32).arrays
    top = 2**bits - 1
    weight, scales, biases = mx.quantize(mx.array(codes.reshape(8, 128).astype(np.float32) - top),
                                         group_size=32, bits=bits)
    assert np.all(np.array(scales) == 1) and np.all(np.array(biases) == -top)
    assert np.array_equal(np.array(ours["weight"]), np.array(weight))


@pytest.mark.parametrize("bits", MLX_BITS)
def test_pack_codes_matches_mx_quantize(bits):
    """MLX's layout for every bit width it has (3, 5 and 6 straddle words): groups whose codes
    span the full range with scale 1 make mx.quantize's words the packing of the codes."""
    top = 2**bits - 1
    codes = np.random.default_rng(bits).integers(0, top + 1, size=(6, 256), dtype=np.uint8)
    codes[:, ::32], codes[:, 1::32] = 0, top
    weight, scales, biases = mx.quantize(mx.array(codes.astype(np.float32) - top),
                                         group_size=32, bits=bits)
    assert np.all(np.array(scales) == 1) and np.all(np.array(biases) == -top)
    assert np.array_equal(pack_codes(codes, bits), np.array(weight))


# --- 2. tiny llama / qwen2 / qwen3 models, logits against an mlx-lm float reference --------

H, LAYERS, HEADS, KV_HEADS, FFN, VOCAB = 64, 2, 4, 2, 128, 300
# arch -> (head_dim, tied, embedding type, types cycled over the other matrices)
MODELS = {
    "llama": (16, True, T.Q8_0, [T.Q4_0, T.Q4_1, T.Q8_0, T.Q5_0]),
    "qwen2": (16, False, T.Q5_0, [T.Q8_0, T.Q4_0, T.Q5_1, T.Q4_1, T.F16]),
    "qwen3": (32, True, T.F16, [T.Q4_1, T.BF16, T.Q8_0, T.Q4_0, T.F32]),
}


def hf_model(arch: str, rng) -> dict[str, np.ndarray]:
    head_dim, tied, _, _ = MODELS[arch]
    shapes = {"model.embed_tokens.weight": (VOCAB, H), "model.norm.weight": (H,)}
    if not tied:
        shapes["lm_head.weight"] = (VOCAB, H)
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        shapes.update({
            p + "input_layernorm.weight": (H,), p + "post_attention_layernorm.weight": (H,),
            p + "self_attn.q_proj.weight": (HEADS * head_dim, H),
            p + "self_attn.k_proj.weight": (KV_HEADS * head_dim, H),
            p + "self_attn.v_proj.weight": (KV_HEADS * head_dim, H),
            p + "self_attn.o_proj.weight": (H, HEADS * head_dim),
            p + "mlp.gate_proj.weight": (FFN, H), p + "mlp.up_proj.weight": (FFN, H),
            p + "mlp.down_proj.weight": (H, FFN)})
        if arch == "qwen2":
            for proj, rows in (("q", HEADS), ("k", KV_HEADS), ("v", KV_HEADS)):
                shapes[p + f"self_attn.{proj}_proj.bias"] = (rows * head_dim,)
        if arch == "qwen3":
            shapes[p + "self_attn.q_norm.weight"] = shapes[p + "self_attn.k_norm.weight"] = (
                head_dim,)

    weights = {}
    for name, shape in shapes.items():
        if name.endswith("norm.weight"):
            weights[name] = 1 + 0.1 * rng.standard_normal(shape)
        elif "q_proj.weight" in name or "k_proj.weight" in name:
            weights[name] = 0.5 * rng.standard_normal(shape)  # peaked attention: RoPE matters
        elif "embed_tokens" in name:
            weights[name] = rng.standard_normal(shape)
        else:
            weights[name] = 0.15 * rng.standard_normal(shape)
    return {k: v.astype(np.float32) for k, v in weights.items()}


def tensor_type_plan(arch: str, names) -> dict[str, T]:
    _, _, embed_type, cycle = MODELS[arch]
    plan, i = {}, 0
    for name in names:
        if name == "model.embed_tokens.weight":
            plan[name] = embed_type
        elif name.endswith(".bias") or name.endswith("norm.weight"):
            plan[name] = T.F32
        else:
            plan[name] = cycle[i % len(cycle)]
            i += 1
    return plan


def model_metadata(arch: str, head_dim: int) -> dict:
    kv = {f"{arch}.block_count": LAYERS, f"{arch}.context_length": 4096,
          f"{arch}.embedding_length": H, f"{arch}.feed_forward_length": FFN,
          f"{arch}.attention.head_count": HEADS, f"{arch}.attention.head_count_kv": KV_HEADS,
          f"{arch}.attention.layer_norm_rms_epsilon": 1e-6, f"{arch}.rope.freq_base": 10000.0}
    if head_dim != H // HEADS:
        kv[f"{arch}.attention.key_length"] = kv[f"{arch}.attention.value_length"] = head_dim
    if arch == "llama":  # vocab size from the token list
        kv["tokenizer.ggml.tokens"] = [f"t{i}" for i in range(VOCAB)]
    else:
        kv[f"{arch}.vocab_size"] = VOCAB
    return kv


def write_model(path: Path, arch: str, weights: dict[str, np.ndarray], plan: dict[str, T],
                extra_kv: dict | None = None) -> Path:
    tensors = {}
    for name, w in weights.items():
        if arch == "llama" and name.endswith("q_proj.weight"):
            w = llama_cpp_permute(w, HEADS)
        elif arch == "llama" and name.endswith("k_proj.weight"):
            w = llama_cpp_permute(w, KV_HEADS)
        tensors[to_gguf_name(name)] = (gguf.quants.quantize(w, plan[name]), plan[name])
    kv = model_metadata(arch, MODELS[arch][0]) | (extra_kv or {})
    return write_gguf(path, arch, kv, tensors)


TOKENS = [1, 7, 42, 299, 3, 150, 8, 64, 2, 255]


def logits(arch: str, config: dict, weights: list, quantization: dict | None = None,
           tokens: list[int] = TOKENS) -> np.ndarray:
    """[len(tokens), vocab] float32 logits of mlx-lm's model class for ``arch``."""
    module = importlib.import_module(f"mlx_lm.models.{arch}")
    model = module.Model(module.ModelArgs.from_dict(config))
    if quantization:
        nn.quantize(model, class_predicate=lambda p, _: quantization.get(p, False))
    model.load_weights(weights)  # strict: every parameter present, no extras
    return np.array(model(mx.array([tokens]))[0].astype(mx.float32))


@pytest.mark.parametrize("arch", list(MODELS))
def test_tiny_model_logits_match_float_reference(tmp_path, arch):
    head_dim, tied, _, _ = MODELS[arch]
    hf = hf_model(arch, np.random.default_rng(2))
    plan = tensor_type_plan(arch, hf)
    path = write_model(tmp_path / f"{arch}.gguf", arch, hf, plan)

    loaded = load_gguf(path, dtype=mx.float32)
    expected_config = {
        "model_type": arch, "hidden_size": H, "num_hidden_layers": LAYERS,
        "intermediate_size": FFN, "num_attention_heads": HEADS, "num_key_value_heads": KV_HEADS,
        "head_dim": head_dim, "rms_norm_eps": pytest.approx(1e-6), "rope_theta": 10000.0,
        "vocab_size": VOCAB, "max_position_embeddings": 4096, "tie_word_embeddings": tied,
        "attention_bias": False}  # qwen2's q/k/v biases come with its model type
    assert {k: loaded.config[k] for k in expected_config} == expected_config
    assert "rope_scaling" not in loaded.config
    assert loaded.tensor_types == {name: t.name for name, t in plan.items()}
    quantized = {n.rsplit(".", 1)[0]: BITS[t] for n, t in plan.items() if t in BITS}
    assert {m: q["bits"] for m, q in loaded.quantization.items()} == quantized
    assert all(q["group_size"] == 32 and q["mode"] == "affine"
               for q in loaded.quantization.values())

    # Reference: the same mlx-lm class with float32 weights in HF layout, i.e. the original random
    # weights through gguf's own quantize -> dequantize (rows are quantized independently, so
    # this equals un-permuting the file's dequantized llama q/k).
    ref_weights = {n: gguf.quants.dequantize(gguf.quants.quantize(w, plan[n]), plan[n])
                   for n, w in hf.items()}
    config = {k: loaded.config[k] for k in expected_config}
    reference = logits(arch, config, [(n, mx.array(w)) for n, w in ref_weights.items()])
    ours = logits(arch, loaded.config, list(loaded.weights.items()), loaded.quantization)
    np.testing.assert_allclose(ours, reference, atol=1e-4, rtol=0)

    if arch == "llama":  # the check above must be able to see a missing un-permutation
        permuted = dict(ref_weights)
        for name in permuted:
            if name.endswith(("q_proj.weight", "k_proj.weight")):
                heads = HEADS if "q_proj" in name else KV_HEADS
                permuted[name] = llama_cpp_permute(permuted[name], heads)
        wrong = logits(arch, config, [(n, mx.array(w)) for n, w in permuted.items()])
        assert np.abs(wrong - reference).max() > 1e-2


# --- 3. the real SmolLM2 file -------------------------------------------------------------------

def test_smollm2_says_paris(smollm2_path):
    path = smollm2_path
    start = time.perf_counter()
    # float32: MLX's CPU back-end runs float16 quantized matmuls ~40x slower (40 s for this
    # prompt); the float16 scales themselves are checked exactly in test_tensor_type_is_exact.
    loaded = load_gguf(path, dtype=mx.float32)
    print(f"load_gguf({path.name}): {time.perf_counter() - start:.2f} s")

    assert loaded.config["num_hidden_layers"] == 30 and loaded.config["tie_word_embeddings"]
    assert loaded.quantization["model.embed_tokens"]["bits"] == 8  # Q8_0
    assert loaded.quantization["model.layers.0.self_attn.q_proj"]["bits"] == 4  # Q4_1
    assert loaded.metadata["tokenizer.ggml.model"] == "gpt2"

    the_capital_of_france_is = [504, 3575, 282, 4649, 314]
    out = logits("llama", loaded.config, list(loaded.weights.items()), loaded.quantization,
                 tokens=the_capital_of_france_is)[-1].astype(np.float64)
    log_probs = out - np.logaddexp.reduce(out)
    assert int(out.argmax()) == 7042  # " Paris"
    assert log_probs[7042] == pytest.approx(-0.26, abs=0.05)


# --- 4. what we refuse --------------------------------------------------------------------------

@pytest.mark.parametrize("qtype", [T.Q2_K, T.IQ2_XXS, T.IQ4_NL, T.TQ1_0], ids=lambda t: t.name)
def test_unsupported_tensor_type_names_the_tensor(tmp_path, qtype):
    """Types without an MLX affine form are refused in one line naming tensor and type, by the
    loader and through load_model (what the command line prints)."""
    from mlxserve.loader import ModelLoadError, load_model

    block, block_bytes = gguf.GGML_QUANT_SIZES[qtype]
    raw = np.random.default_rng(3).integers(0, 256, (4, 256 // block * block_bytes), np.uint8)
    path = minimal_file(tmp_path / "x.gguf", "llama", {},
                        {"blk.0.ffn_up.weight": (raw, qtype)})
    with pytest.raises(UnsupportedGGUF, match=rf"'blk\.0\.ffn_up\.weight'.*{qtype.name}"):
        load_gguf(path)
    with pytest.raises(ModelLoadError) as info:
        load_model(str(path), progress=False)
    assert qtype.name in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize("qtype,shape", [(T.Q8_0, (4, 0)), (T.Q8_0, (0, 34)), (T.F32, (0, 64))],
                         ids=lambda x: getattr(x, "name", str(x)))
def test_a_tensor_with_a_dimension_of_0_is_named(tmp_path, qtype, shape):
    """Quantized, it said "cannot reshape array of size 0 into shape (0)" (or, without rows,
    "IndexError: list index out of range"), naming no tensor."""
    from mlxserve.loader import ModelLoadError, load_model

    dtype = np.float32 if qtype == T.F32 else np.uint8
    path = minimal_file(tmp_path / "x.gguf", "llama", {}, {"blk.0.ffn_up.weight": (np.zeros(shape, dtype), qtype)})
    dims = list(open_gguf(path).tensors[1].shape)
    assert 0 in dims
    with pytest.raises(ModelLoadError) as info:
        load_model(str(path), progress=False)
    assert str(info.value) == (f"cannot load {path}: tensor 'blk.0.ffn_up.weight' ({qtype.name}) has the empty "
                               f"shape {dims}: a dimension of 0 holds no weights")


def _file_with_rows_of(path: Path, qtype: T, cols: int) -> Path:
    """A file whose blk.0.ffn_up.weight (4 rows of `cols` values, of type `qtype`) holds the
    bytes a reader takes for it, whether or not `cols` is whole blocks of the type."""
    block, block_bytes = gguf.GGML_QUANT_SIZES[qtype]
    writer = gguf.GGUFWriter(str(path), "llama")
    for key, value in model_metadata("llama", H // HEADS).items():
        {int: writer.add_uint32, float: writer.add_float32, list: writer.add_array}[type(value)](key, value)
    writer.add_tensor("token_embd.weight", np.zeros((VOCAB, H), np.float32))
    raw = np.random.default_rng(3).integers(-128, 128, 4 * cols * block_bytes // block, np.int8)
    writer.add_tensor("blk.0.ffn_up.weight", raw, raw_shape=(4, cols), raw_dtype=qtype)  # (int8: taken as is)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.mark.parametrize("qtype", [T.IQ2_XXS, T.IQ4_XS, T.TQ1_0], ids=lambda t: t.name)
def test_an_unsupported_type_whose_rows_are_not_whole_blocks_is_refused_for_its_type(tmp_path, qtype):
    """It said gguf's "row size (64) is not a multiple of IQ2_XXS block size (256)", where the
    same tensor with whole blocks gets the line every type we cannot load gets."""
    from mlxserve.loader import ModelLoadError, load_model

    messages = []
    for cols in (64, 256):
        path = _file_with_rows_of(tmp_path / f"{cols}.gguf", qtype, cols)
        with pytest.raises(ModelLoadError) as info:
            load_model(str(path), progress=False)
        messages.append(str(info.value).replace(str(path), "FILE"))
    assert messages[0] == messages[1] and f"type {qtype.name}, which mlxserve cannot load" in messages[0]


def test_a_supported_type_whose_rows_are_not_whole_blocks_is_named(tmp_path):
    from mlxserve.loader import ModelLoadError, load_model

    path = _file_with_rows_of(tmp_path / "x.gguf", T.Q8_0, 48)
    with pytest.raises(ModelLoadError) as info:
        load_model(str(path), progress=False)
    assert str(info.value) == (f"cannot load {path}: tensor 'blk.0.ffn_up.weight' (Q8_0) has rows of 48 values, "
                               "not a whole number of Q8_0's 32-value blocks: the file is damaged")


def test_unknown_mode_is_refused(tmp_path):
    from mlxserve.loader import ModelLoadError, load_model

    path = minimal_file(tmp_path / "m.gguf", "llama", {})
    with pytest.raises(ValueError, match="native-q4"):
        load_gguf(path, mode="q3")
    with pytest.raises(ModelLoadError, match="native-q4"):
        load_model(str(path), progress=False, gguf_mode="q3")


@pytest.mark.parametrize("kv,says", [
    # Row orders for llama's q/k were built from these and taken from 64-row tensors: a crash.
    ({"llama.attention.key_length": 4096, "llama.attention.value_length": 4096},
     "tensor 'blk.0.attn_q.weight' has 64 rows, not the 4 heads x 4096 the metadata declares"),
    ({"llama.embedding_length": 2**31}, "llama.embedding_length is 2147483648 but token_embd has 64 columns"),
    # A million layers were built (and memory ran out) before their weights were found missing.
    ({"llama.block_count": 10**6}, "its metadata's block_count is 1000000, but the weights hold 2 layers"),
    ({"llama.block_count": 0}, "llama.block_count must be a whole number >= 1, got 0"),
    ({"llama.attention.head_count_kv": "2"}, "llama.attention.head_count_kv must be a whole number >= 1, got '2'"),
    ({"llama.context_length": 0}, "llama.context_length must be a whole number >= 1, got 0"),
    # These said "could not convert string to float: 'x'", "math domain error",
    # "ZeroDivisionError: float division by zero" or mlx.random.uniform's signature, naming no key.
    ({"llama.attention.layer_norm_rms_epsilon": "x"},
     "GGUF metadata llama.attention.layer_norm_rms_epsilon must be a number >= 0, got 'x'"),
    ({"llama.rope.freq_base": 0.0}, "GGUF metadata llama.rope.freq_base must be a number > 0, got 0.0"),
    ({"llama.rope.freq_base": "x"}, "GGUF metadata llama.rope.freq_base must be a number > 0, got 'x'"),
    ({"llama.rope.scaling.type": "linear", "llama.rope.scaling.factor": 0.0},
     "GGUF metadata llama.rope.scaling.factor must be a number > 0, got 0.0"),
    ({"llama.feed_forward_length": "x"}, "GGUF metadata llama.feed_forward_length must be a whole number >= 1, got 'x'"),
    ({"llama.feed_forward_length": 0}, "GGUF metadata llama.feed_forward_length must be a whole number >= 1, got 0"),
    # The vocabulary size is the token count: a string's characters were counted as tokens
    # ("vocab size 3 != token_embd rows 300"), and a number said "object of type 'int' has no len()".
    ({"tokenizer.ggml.tokens": "abc"}, "GGUF metadata tokenizer.ggml.tokens must be an array of strings, got a string"),
    ({"tokenizer.ggml.tokens": 300}, "GGUF metadata tokenizer.ggml.tokens must be an array of strings, got the number 300"),
    # Passed over silently, as if the file had no window.
    ({"llama.attention.sliding_window": "x"}, "GGUF metadata llama.attention.sliding_window must be a whole number >= 1, got 'x'"),
    ({"llama.attention.sliding_window": 0}, "GGUF metadata llama.attention.sliding_window must be a whole number >= 1, got 0"),
])
def test_metadata_at_odds_with_the_tensors_is_one_line(tmp_path, kv, says):
    from mlxserve.loader import ModelLoadError, load_model

    hf = hf_model("llama", np.random.default_rng(5))
    path = write_model(tmp_path / "m.gguf", "llama", hf, tensor_type_plan("llama", hf), extra_kv=kv)
    with pytest.raises(ModelLoadError) as err:
        load_model(str(path), progress=False)
    assert says in str(err.value) and "\n" not in str(err.value), str(err.value)


def test_row_orders_that_do_not_fit_their_tensor_are_refused():
    """The last guard (any architecture's placements): MLX does not bounds-check the index
    arrays that reorder a tensor's rows or columns."""
    from mlxserve.quant.gguf import _check_reordering
    from mlxserve.quant.gguf_convert import Placement
    from mlxserve.quant.gguf_metadata import GGUFTensor

    tensor = GGUFTensor("blk.0.attn_q.weight", T.F32, (8, 6), np.zeros((6, 8), np.float32))
    _check_reordering(tensor, Placement("q", rows=np.arange(6)[::-1], columns=np.arange(8)))
    for placement, says in [(Placement("q", rows=np.arange(12)), "has 6 rows, not the 12"),
                            (Placement("q", rows=np.array([0, 1, 2, 3, 4, 9])), r"has 6 rows, and .* one past them \(9\)"),
                            (Placement("q", columns=np.arange(4)), "has 8 columns, not the 4")]:
        with pytest.raises(UnsupportedGGUF, match=says):
            _check_reordering(tensor, placement)


def _data_start(path: Path) -> int:
    """Where a file's tensor data begins (its first tensor's first byte)."""
    reader = gguf.GGUFReader(str(path))
    return min(int(t.data_offset) for t in reader.tensors)


def test_a_truncated_file_says_so_wherever_the_cut_falls(tmp_path):
    """Cut inside the header, the metadata or the tensor infos, the reader failed with
    struct.error (a traceback on the command line); cut inside the tensor data, with
    "cannot reshape array of size ...". Now: one GGUFFormatError naming the file."""
    from mlxserve.quant.gguf_metadata import GGUFFormatError

    hf = hf_model("llama", np.random.default_rng(4))
    full = write_model(tmp_path / "full.gguf", "llama", hf, tensor_type_plan("llama", hf))
    data, start = full.read_bytes(), _data_start(full)
    cut = tmp_path / "cut.gguf"
    for size in [*range(0, start, 7), start - 1, start, start + 1000, len(data) - 1]:
        cut.write_bytes(data[:size])
        with pytest.raises(GGUFFormatError) as err:
            open_gguf(cut)
        message = str(err.value)
        assert message.startswith(f"{cut} is truncated") and "\n" not in message, (size, message)
        if size >= start:  # the tensor data is cut: say which tensor and how much is missing
            assert f"{len(data) - size:,} missing" in message, message
            if size == len(data) - 1:  # only the last tensor is cut: one, not "1 ... are", "the first"
                assert re.search(r"; 1 of its \d+ tensors is cut off: '[^']+' \(bytes", message), message
            else:
                assert re.search(r"; \d+ of its \d+ tensors are cut off, the first being '", message), message


def test_a_truncated_file_on_the_command_line_is_one_line(tmp_path, capsys):
    from mlxserve import cli
    from mlxserve.loader import ModelLoadError, load_model

    hf = hf_model("llama", np.random.default_rng(4))
    full = write_model(tmp_path / "full.gguf", "llama", hf, tensor_type_plan("llama", hf))
    data, start = full.read_bytes(), _data_start(full)
    for size, needle in [(24, "is truncated or not a valid GGUF file"), (100, "is truncated or not a valid GGUF file"),
                         (start + 1000, "is truncated: it has")]:
        cut = tmp_path / f"cut{size}.gguf"
        cut.write_bytes(data[:size])
        with pytest.raises(ModelLoadError, match=f"^{cut} {needle}"):
            load_model(str(cut), progress=False)
        assert cli.main(["run", "--model", str(cut), "hi"]) == 2
        err = capsys.readouterr().err.splitlines()
        assert len(err) == 1 and err[0].startswith(f"mlxserve: error: {cut} {needle}"), err


def test_bfloat16_for_a_gguf_file_is_one_line_naming_it_as_the_flag_does(tmp_path, capsys):
    """`run --dtype bfloat16` on a GGUF file printed the CPU's half-precision warning and then
    "dtype must be mx.float16 or mx.float32, not mlx.core.bfloat16": one line now, in --dtype's words."""
    from mlxserve import cli

    hf = hf_model("llama", np.random.default_rng(4))
    path = write_model(tmp_path / "m.gguf", "llama", hf, tensor_type_plan("llama", hf))
    assert cli.main(["run", "--model", str(path), "--dtype", "bfloat16", "hi"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert err == [f"mlxserve: error: cannot load {path}: a GGUF file loads as float16 or float32, not bfloat16 "
                   "(GGUF block scales are float16 values that bfloat16 would round)"]


def test_garbage_after_the_magic_is_not_a_valid_gguf_file(tmp_path):
    from mlxserve.quant.gguf_metadata import GGUFFormatError

    path = tmp_path / "junk.gguf"
    for seed in range(20):
        junk = np.random.default_rng(seed).integers(0, 256, 4096, np.uint8).tobytes()
        path.write_bytes(b"GGUF" + (3).to_bytes(4, "little") + junk)
        with pytest.raises(GGUFFormatError, match="is truncated or not a valid GGUF file"):
            open_gguf(path)


@pytest.mark.parametrize("scale", [np.inf, np.nan])
def test_a_scale_that_is_not_finite_in_the_file_says_the_file_is_damaged(tmp_path, scale):
    """It said the scale "overflows mlx.core.float32; load with dtype=mx.float32": no help."""
    stored = gguf.quants.quantize(random_matrix(np.random.default_rng(0)), T.Q8_0)
    stored[3, :2] = np.frombuffer(np.float16(scale).tobytes(), np.uint8)  # (a block's d)
    path = write_gguf(tmp_path / "t.gguf", "llama", {}, {"blk.0.ffn_up.weight": (stored, T.Q8_0)})
    for dtype in (mx.float32, mx.float16):
        with pytest.raises(ValueError) as err:
            convert_tensor(open_gguf(path).tensors[0], dtype)
        assert str(err.value) == ("a scale or bias of tensor 'blk.0.ffn_up.weight' (Q8_0) is not a finite number "
                                  "(inf or NaN): the file is damaged")


def test_a_tensor_offset_off_the_alignment_is_not_a_valid_gguf_file(tmp_path):
    """Read from there, the tensor's bytes were garbage: "a scale or bias of tensor ... overflows"."""
    import struct

    from mlxserve.quant.gguf_metadata import GGUFFormatError

    path = minimal_file(tmp_path / "m.gguf", "llama", {})
    info = gguf.GGUFReader(str(path)).tensors[0].field
    at = info.offset + sum(part.nbytes for part in info.parts[:-1])  # (the last part: the offset)
    data = bytearray(path.read_bytes())
    data[at:at + 8] = struct.pack("<Q", 3)
    path.write_bytes(bytes(data))
    with pytest.raises(GGUFFormatError) as err:
        open_gguf(path)
    assert str(err.value) == (f"{path} is truncated or not a valid GGUF file: the data of tensor 'token_embd.weight' "
                              "starts at offset 3, not a multiple of the alignment (32)")


def test_a_file_without_tensors_says_the_embedding_is_missing(tmp_path):
    """A valid header and metadata but no tensors said only "cannot load ...: 'token_embd.weight'"."""
    from mlxserve.loader import ModelLoadError, load_model

    path = write_gguf(tmp_path / "empty.gguf", "llama", model_metadata("llama", H // HEADS), {})
    with pytest.raises(ModelLoadError) as err:
        load_model(str(path), progress=False)
    assert str(err.value) == (f"cannot load {path}: tensor 'token_embd.weight' (the token embedding) "
                              "is missing: the file holds no tensors")


def test_a_token_embedding_that_is_not_a_matrix_is_named(tmp_path):
    """A one-dimensional token_embd said only "IndexError: tuple index out of range"."""
    from mlxserve.loader import ModelLoadError, load_model

    hf = hf_model("llama", np.random.default_rng(5))
    hf["model.embed_tokens.weight"] = hf["model.embed_tokens.weight"].reshape(-1)
    plan = tensor_type_plan("llama", hf) | {"model.embed_tokens.weight": T.F32}
    path = write_model(tmp_path / "m.gguf", "llama", hf, plan)
    with pytest.raises(ModelLoadError) as err:
        load_model(str(path), progress=False)
    assert str(err.value) == (f"cannot load {path}: tensor 'token_embd.weight' (the token embedding) has "
                              f"shape [{VOCAB * H}]; a matrix was expected")


def minimal_file(path: Path, arch: str, kv: dict, extra_tensors: dict | None = None) -> Path:
    """Metadata plus a token embedding: enough for load_gguf to build a config."""
    embed = np.zeros((VOCAB, H), dtype=np.float32)
    tensors = {"token_embd.weight": (embed, T.F32)} | (extra_tensors or {})
    return write_gguf(path, arch, model_metadata(arch, H // HEADS) | kv, tensors)


def test_unsupported_architecture(tmp_path):
    path = minimal_file(tmp_path / "g.gguf", "gemma", {})
    with pytest.raises(UnsupportedGGUF, match="'gemma'"):
        load_gguf(path)


# --- RoPE scaling -------------------------------------------------------------------------------

def llama_cpp_rope_freqs(head_dim, base, factor, low, high, original) -> np.ndarray:
    """rope_freqs as llama.cpp's converter computes it for Llama 3.1-style rope_scaling."""
    freqs = 1.0 / base ** (np.arange(0, head_dim, 2) / head_dim)
    wavelen = 2 * math.pi / freqs
    smooth = (original / wavelen - low) / (high - low)
    out = np.where(wavelen < original / high, 1.0,
                   np.where(wavelen > original / low, factor,
                            1 / ((1 - smooth) / factor + smooth)))
    return out.astype(np.float32)


@pytest.mark.parametrize("factor,low,high,original",
                         [(8.0, 1.0, 4.0, 8192), (32.0, 1.0, 4.0, 8192), (16.0, 0.5, 8.0, 32768)])
def test_llama3_rope_freqs_become_rope_scaling(tmp_path, factor, low, high, original):
    head_dim, base = H // HEADS, 500000.0
    rope_freqs = llama_cpp_rope_freqs(head_dim, base, factor, low, high, original)
    kv = {"llama.rope.freq_base": base}
    if original != 8192:  # 8192 is llama.cpp's default when the original length is not given
        kv["llama.rope.scaling.original_context_length"] = original
    path = minimal_file(tmp_path / "l3.gguf", "llama", kv,
                        {"rope_freqs.weight": (rope_freqs, T.F32)})
    scaling = load_gguf(path).config["rope_scaling"]
    assert scaling["rope_type"] == "llama3" and scaling["factor"] == factor

    true = {"rope_type": "llama3", "factor": factor, "low_freq_factor": low,
            "high_freq_factor": high, "original_max_position_embeddings": original}
    ours = initialize_rope(head_dim, base, False, scaling, 4096)._freqs
    reference = initialize_rope(head_dim, base, False, true, 4096)._freqs
    np.testing.assert_allclose(np.array(ours), np.array(reference), rtol=1e-5)


def test_yarn_and_linear_rope_scaling(tmp_path):
    yarn = minimal_file(tmp_path / "y.gguf", "qwen2", {
        "qwen2.rope.scaling.type": "yarn", "qwen2.rope.scaling.factor": 4.0,
        "qwen2.rope.scaling.original_context_length": 32768})
    assert load_gguf(yarn).config["rope_scaling"] == {
        "rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768}

    linear = minimal_file(tmp_path / "l.gguf", "llama", {
        "llama.rope.scaling.type": "linear", "llama.rope.scaling.factor": 2.0})
    assert load_gguf(linear).config["rope_scaling"] == {"rope_type": "linear", "factor": 2.0}

    longrope = minimal_file(tmp_path / "lr.gguf", "llama", {
        "llama.rope.scaling.type": "longrope", "llama.rope.scaling.factor": 2.0})
    with pytest.raises(UnsupportedGGUF, match="longrope"):
        load_gguf(longrope)


def test_our_reader_matches_gguf_reader_on_the_real_file(smollm2_path):
    """The lean reader returns the same metadata and the same tensor bytes as gguf.GGUFReader."""
    reference = gguf.GGUFReader(str(smollm2_path))
    start = time.perf_counter()
    ours = open_gguf(smollm2_path)
    print(f"open_gguf({smollm2_path.name}): {time.perf_counter() - start:.3f} s")
    expected = {k: f.contents() for k, f in reference.fields.items() if not k.startswith("GGUF.")}
    assert ours.metadata == expected
    assert [t.name for t in ours.tensors] == [t.name for t in reference.tensors]
    for a, b in zip(ours.tensors, reference.tensors):
        assert a.tensor_type == b.tensor_type and a.data.shape == b.data.shape and a.data.dtype == b.data.dtype
        assert np.array_equal(a.data, b.data)
