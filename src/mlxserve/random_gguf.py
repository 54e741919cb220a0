"""Random-weights models in a GGUF quantization mix, loaded through the real GGUF conversion.

``build_random_gguf_model("qwen3-4b", "Q4_K_M", mode="exact")`` makes, in memory, the tensors a
llama.cpp Q4_K_M file of that shape would hold — each quantized tensor random block bytes of the
type llama.cpp's ``llama_tensor_get_type`` (src/llama-quant.cpp) gives it — and hands them with
their metadata to ``quant.gguf.gguf_weights``, the function ``load_gguf`` runs on a file. So a
machine without the file benchmarks the same kernels (exact mode: MLX 4-bit and 8-bit groups of
32; native-q4: 4-bit groups of 64) a real Q4_K_M file gets. No file is written.

Q4_K_M, as llama.cpp assigns it to a dense model of ``n`` layers (default type Q4_K):
- ``output.weight`` Q6_K; with tied embeddings (no output tensor) ``token_embd.weight`` takes
  the output's type, Q6_K, and otherwise stays Q4_K;
- ``attn_v`` and ``ffn_down`` of layer i Q6_K when ``use_more_bits(i, n)``: i < n/8, or
  i >= 7n/8, or (i - n/8) % 3 == 2 (integer division); Q4_K otherwise;
- every other matrix Q4_K; norms (1-D) F32;
- a matrix whose rows are not a multiple of 256 wide falls back: Q4_K -> Q5_0, Q6_K -> Q8_0
  (``tensor_type_fallback``); the output / tied embedding then takes Q8_0.

Blocks are random bytes (every bit pattern of codes and 6-bit / 8-bit sub-block scales is a
valid block), with the float16 super-block scales d (and Q4_K's dmin = 7.5 d, which centres the
values on zero) overwritten so the dequantized weights have the spread ``random_weights`` gives
a float model: std fan_in**-0.5 for projections, 0.02 for the embedding. d varies by up to a
factor sqrt(2) between blocks. Vectorised numpy, a few GB/s.
"""

from __future__ import annotations

import time
from pathlib import Path

import mlx.core as mx
import numpy as np
from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as T

from .loader import LoadedModel, build_model, default_gguf_dtype, parse_dtype
from .quant.gguf_metadata import GGUFTensor
from .random_weights import EMBEDDING_SCALE, SHAPES, RandomTokenizer, shape_config

MIXES = ("Q4_K_M",)
_FILE_TYPE = {"Q4_K_M": 15}  # llama.cpp's LLAMA_FTYPE_MOSTLY_Q4_K_M
_ARCHITECTURES = ("qwen3", "qwen2", "llama")  # dense models whose GGUF names gguf.py maps

# Offsets of the float16 super-block scale(s) in each block type's bytes.
_HALF_OFFSETS = {T.Q4_K: (0, 2), T.Q6_K: (208,), T.Q8_0: (0,), T.Q5_0: (0,)}
Q4_K_DMIN_RATIO = 7.5  # dmin / d: E[sc * q] = 31.5 * 7.5 = E[m] * 7.5, so values average 0
# std of the dequantized values of random blocks with d = 1 (uniform fields, exact):
# Q4_K: sc*q - 7.5 m, sc and m in [0, 63], q in [0, 15]: sqrt(1333.5*77.5 - 236.25**2 + 56.25*341.25)
# Q6_K: sc*(q-32), sc in [-128, 127], q-32 in [-32, 31]: sqrt(5461.5 * 341.5 - 0.25**2)
# Q8_0: q in [-128, 127]: sqrt(5461.5 - 0.25); Q5_0: q - 16 in [-16, 15]: sqrt(85.5 - 0.25)
UNIT_STD = {T.Q4_K: 258.315, T.Q6_K: 1365.688, T.Q8_0: 73.902, T.Q5_0: 9.233}
_FALLBACK = {T.Q4_K: T.Q5_0, T.Q6_K: T.Q8_0}


def use_more_bits(i_layer: int, n_layers: int) -> bool:
    """llama.cpp's rule for the layers whose attn_v / ffn_down get more bits."""
    return (i_layer < n_layers // 8 or i_layer >= 7 * n_layers // 8
            or (i_layer - n_layers // 8) % 3 == 2)


def q4_k_m_type(name: str, cols: int, n_layers: int, tied: bool) -> T:
    """The type llama.cpp's Q4_K_M gives the 2-D tensor ``name`` (GGUF name) of ``cols``
    columns in a dense model of ``n_layers`` layers."""
    if name == "output.weight" or (tied and name == "token_embd.weight"):
        return T.Q8_0 if cols % 256 else T.Q6_K
    kind = T.Q4_K
    if (name.endswith((".attn_v.weight", ".ffn_down.weight"))
            and use_more_bits(int(name.split(".")[1]), n_layers)):
        kind = T.Q6_K
    return _FALLBACK[kind] if cols % 256 else kind


def random_blocks(kind: T, rows: int, cols: int, std: float, seed) -> np.ndarray:
    """uint8 [rows, bytes per row]: random blocks of ``kind`` whose values have about ``std``."""
    block, size = GGML_QUANT_SIZES[kind]
    n_blocks = rows * cols // block
    bit_gen = np.random.PCG64(seed)
    words = -(-n_blocks * size // 8)
    raw = bit_gen.random_raw(words).view(np.uint8)[:n_blocks * size].reshape(n_blocks, size)
    rng = np.random.Generator(bit_gen)
    d = (std / UNIT_STD[kind]) * np.exp2(rng.uniform(-0.25, 0.25, n_blocks))
    halves = [d.astype(np.float16)]
    if kind == T.Q4_K:
        halves.append((d * Q4_K_DMIN_RATIO).astype(np.float16))
    for offset, half in zip(_HALF_OFFSETS[kind], halves):
        raw[:, offset:offset + 2] = half.view(np.uint8).reshape(n_blocks, 2)
    return raw.reshape(rows, -1)


def gguf_names(config: dict) -> list[tuple[str, tuple[int, ...]]]:
    """(GGUF name, GGUF shape: fastest dimension first) of every tensor of a dense model."""
    hidden, inter = config["hidden_size"], config["intermediate_size"]
    head_dim = config.get("head_dim") or hidden // config["num_attention_heads"]
    q_rows = config["num_attention_heads"] * head_dim
    kv_rows = config["num_key_value_heads"] * head_dim
    names = [("token_embd.weight", (hidden, config["vocab_size"])), ("output_norm.weight", (hidden,))]
    if not config.get("tie_word_embeddings", False):
        names.append(("output.weight", (hidden, config["vocab_size"])))
    for i in range(config["num_hidden_layers"]):
        b = f"blk.{i}."
        names += [(b + "attn_norm.weight", (hidden,)), (b + "ffn_norm.weight", (hidden,)),
                  (b + "attn_q.weight", (hidden, q_rows)), (b + "attn_k.weight", (hidden, kv_rows)),
                  (b + "attn_v.weight", (hidden, kv_rows)), (b + "attn_output.weight", (q_rows, hidden)),
                  (b + "ffn_gate.weight", (hidden, inter)), (b + "ffn_up.weight", (hidden, inter)),
                  (b + "ffn_down.weight", (inter, hidden))]
        if config["model_type"] == "qwen3":
            names += [(b + "attn_q_norm.weight", (head_dim,)), (b + "attn_k_norm.weight", (head_dim,))]
    return names


def gguf_metadata(config: dict, mix: str) -> dict:
    """The metadata llama.cpp's converter writes for ``config`` (what gguf.py reads)."""
    arch = config["model_type"]
    head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    return {
        "general.architecture": arch, "general.file_type": _FILE_TYPE[mix],
        f"{arch}.block_count": config["num_hidden_layers"],
        f"{arch}.context_length": config["max_position_embeddings"],
        f"{arch}.embedding_length": config["hidden_size"],
        f"{arch}.feed_forward_length": config["intermediate_size"],
        f"{arch}.attention.head_count": config["num_attention_heads"],
        f"{arch}.attention.head_count_kv": config["num_key_value_heads"],
        f"{arch}.attention.key_length": head_dim, f"{arch}.attention.value_length": head_dim,
        f"{arch}.attention.layer_norm_rms_epsilon": config["rms_norm_eps"],
        f"{arch}.rope.freq_base": config.get("rope_theta", 10000.0),
        f"{arch}.vocab_size": config["vocab_size"],
    }


def random_gguf_tensors(config: dict, mix: str = "Q4_K_M", seed: int = 0) -> list[GGUFTensor]:
    """The tensors of a ``mix`` GGUF file of ``config``'s shape, quantized ones random blocks."""
    if mix not in MIXES:
        raise ValueError(f"unknown GGUF mix {mix!r} (known: {', '.join(MIXES)})")
    if config["model_type"] not in _ARCHITECTURES:
        raise ValueError(f"--random-gguf: shapes of architecture {config['model_type']!r} are not "
                         f"supported (use one of {', '.join(_ARCHITECTURES)})")
    names = gguf_names(config)
    tied = not any(name == "output.weight" for name, _ in names)
    seeds = np.random.SeedSequence(seed).spawn(len(names))
    tensors = []
    for (name, shape), tensor_seed in zip(names, seeds):
        if len(shape) == 1:
            tensors.append(GGUFTensor(name, T.F32, shape, np.ones(shape, dtype=np.float32)))
            continue
        cols, rows = shape
        kind = q4_k_m_type(name, cols, config["num_hidden_layers"], tied)
        std = EMBEDDING_SCALE if name == "token_embd.weight" else cols ** -0.5
        tensors.append(GGUFTensor(name, kind, shape, random_blocks(kind, rows, cols, std, tensor_seed)))
    return tensors


def gguf_shapes() -> list[str]:
    """The random-weights shapes --random-gguf can write."""
    return [name for name, config in SHAPES.items() if config["model_type"] in _ARCHITECTURES]


def build_random_gguf_model(shape: str, mix: str = "Q4_K_M", *, mode: str = "exact",
                            dtype: str | None = None, seed: int = 0) -> LoadedModel:
    """``shape`` from SHAPES as a ``mix`` GGUF of random blocks, converted in ``mode`` ("exact"
    or "native-q4") with scales in ``dtype`` (float16 or float32; default as for a GGUF file).
    ``load_seconds`` is the conversion and model build, not the making of the random blocks."""
    from .quant.gguf import gguf_weights

    config = shape_config(shape)
    if config["model_type"] not in _ARCHITECTURES:
        raise ValueError(f"--random-gguf: no GGUF layout for the {config['model_type']} shape {shape!r} "
                         f"(shapes it has: {', '.join(gguf_shapes())})")
    tensors = random_gguf_tensors(config, mix, seed)
    start = time.perf_counter()
    weights = gguf_weights(gguf_metadata(config, mix), tensors, parse_dtype(dtype) or default_gguf_dtype(), mode)
    del tensors
    model = build_model(weights.config, weights.weights, weights.quantization)
    mx.eval(model.parameters())
    return LoadedModel(
        model=model,
        tokenizer=RandomTokenizer(weights.config["vocab_size"]),
        config=weights.config,
        name=f"random:{shape}",
        path=Path("."),
        format="gguf",
        quantization=f"{mix} (random blocks)" + (" as MLX 4-bit g64" if mode == "native-q4" else ""),
        context_length=int(weights.config["max_position_embeddings"]),
        load_seconds=time.perf_counter() - start,
    )
