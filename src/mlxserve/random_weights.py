"""Real model shapes with random weights, so a machine without weight files can benchmark.

`build_random_model("qwen3-0.6b")` returns a LoadedModel whose parameters are drawn on the
device with `mx.random` (no host loops), a piece at a time (PIECE_ELEMENTS): matrices
N(0, 1/fan_in) (0.01-0.03 at real sizes), embeddings N(0, 0.02²), norms ones. Every projection then keeps its input's
scale, so activations stay finite through every layer in bf16, and the layers, not the
embedding, decide the next token (a tiny model's greedy output depends on the whole prompt).
The cost of a forward pass is that of the real model. Add a shape to SHAPES to benchmark it.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from .loader import LoadedModel, build_model, parse_dtype

EMBEDDING_SCALE = 0.02

_QWEN3 = dict(model_type="qwen3", vocab_size=151936, num_key_value_heads=8, head_dim=128,
              tie_word_embeddings=True, rope_theta=1000000.0, rms_norm_eps=1e-6,
              max_position_embeddings=40960)

_QWEN3_5 = dict(model_type="qwen3_5", vocab_size=248320, head_dim=256, tie_word_embeddings=True,
                rms_norm_eps=1e-6, max_position_embeddings=262144, full_attention_interval=4,
                linear_num_key_heads=16, linear_key_head_dim=128, linear_value_head_dim=128,
                linear_conv_kernel_dim=4,
                rope_parameters={"rope_type": "default", "rope_theta": 10000000.0,
                                 "partial_rotary_factor": 0.25, "mrope_section": [11, 11, 10]})

# Hugging Face config.json fields of each shape (the published configs of these models).
SHAPES: dict[str, dict] = {
    "qwen3-0.6b": dict(_QWEN3, hidden_size=1024, num_hidden_layers=28, num_attention_heads=16,
                       intermediate_size=3072),
    "qwen3-4b": dict(_QWEN3, hidden_size=2560, num_hidden_layers=36, num_attention_heads=32,
                     intermediate_size=9728),
    # Qwen3.5 (hybrid): three Gated-DeltaNet layers, then one gated full-attention layer.
    "qwen3.5-0.8b": dict(_QWEN3_5, hidden_size=1024, num_hidden_layers=24, intermediate_size=3584,
                         num_attention_heads=8, num_key_value_heads=2, linear_num_value_heads=16),
    "qwen3.5-4b": dict(_QWEN3_5, hidden_size=2560, num_hidden_layers=32, intermediate_size=9216,
                       num_attention_heads=16, num_key_value_heads=4, linear_num_value_heads=32),
    # For tests: the Qwen3 architecture at a size the CPU runs in milliseconds.
    "tiny": dict(_QWEN3, vocab_size=512, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=16, intermediate_size=128, max_position_embeddings=4096),
    # For GGUF K-quant tests (--random-gguf): every matrix dimension a multiple of 256.
    "tiny-256": dict(_QWEN3, vocab_size=512, hidden_size=256, num_hidden_layers=4, num_attention_heads=4,
                     num_key_value_heads=2, head_dim=64, intermediate_size=512, max_position_embeddings=4096),
    "tiny-qwen3.5": dict(_QWEN3_5, vocab_size=512, hidden_size=64, num_hidden_layers=4, num_attention_heads=4,
                         num_key_value_heads=2, head_dim=16, intermediate_size=128, linear_num_key_heads=2,
                         linear_num_value_heads=4, linear_key_head_dim=32, linear_value_head_dim=16,
                         max_position_embeddings=4096),
}

QUANTIZE_BITS = (4, 8)
QUANTIZE_GROUP_SIZE = 64

# The most elements one MLX evaluation of the build draws (32 MB in bfloat16: about half a
# second on a busy 2-core CPU). Python runs a Ctrl-C's handler only between MLX calls: built in
# one evaluation, qwen3-0.6b's weights kept a Ctrl-C waiting 4-15 s there, qwen3-4b's longer.
PIECE_ELEMENTS = 1 << 24


class RandomTokenizer:
    """What the engine needs from a tokenizer when there is no vocabulary: no EOS ids (a
    benchmark ignores EOS anyway) and no text."""

    eos_token_ids: frozenset[int] = frozenset()
    bos_token_id = None
    chat_template = None

    def __init__(self, vocab_size: int):
        self.vocab_size = vocab_size

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        return ""


def shape_config(shape: str) -> dict:
    try:
        return dict(SHAPES[shape])
    except KeyError:
        raise ValueError(f"unknown random-weights shape '{shape}' (known: {', '.join(SHAPES)})") from None


def random_weights(config: dict, dtype: mx.Dtype, seed: int = 0) -> dict[str, mx.array]:
    """Random arrays named and shaped like the parameters of `config`'s model, evaluated one
    by one (see PIECE_ELEMENTS)."""
    skeleton = build_skeleton(config)
    names = tree_flatten(skeleton.parameters())
    keys = mx.random.split(mx.random.key(seed), len(names))
    weights = {}
    for (name, param), key in zip(names, keys):
        if "norm" in name:
            weights[name] = mx.ones(param.shape, dtype=dtype)
            mx.eval(weights[name])
        else:
            scale = EMBEDDING_SCALE if "embed" in name else param.shape[-1] ** -0.5
            weights[name] = _normal(param.shape, dtype, scale, key)
    return weights


def _normal(shape: tuple[int, ...], dtype: mx.Dtype, scale: float, key: mx.array) -> mx.array:
    """N(0, scale²) of `shape`, evaluated; a larger array than PIECE_ELEMENTS is drawn in
    blocks of rows, each with a key of its own and evaluated on its own, then joined (one
    copy: 0.2 s for qwen3-0.6b's embedding, against 4.5 s to draw it)."""
    rows = max(1, PIECE_ELEMENTS // math.prod(shape[1:]))
    if shape[0] <= rows:
        array = mx.random.normal(shape, dtype=dtype, scale=scale, key=key)
        mx.eval(array)
        return array
    starts = range(0, shape[0], rows)
    pieces = []
    for start, piece_key in zip(starts, mx.random.split(key, len(starts))):
        pieces.append(mx.random.normal((min(rows, shape[0] - start), *shape[1:]), dtype=dtype, scale=scale,
                                       key=piece_key))
        mx.eval(pieces[-1])
    array = mx.concatenate(pieces)
    mx.eval(array)
    return array


def build_skeleton(config: dict) -> nn.Module:
    """The model class of `config` with MLX's default (lazy, never evaluated) parameters."""
    from .models import get_family

    family = get_family(config["model_type"])
    return family.Model(family.ModelArgs.from_config(config))


def build_random_model(shape: str, *, dtype: str | None = None, quantize: int | None = None,
                       seed: int = 0) -> LoadedModel:
    """`shape` from SHAPES with random weights in `dtype` (default bfloat16), optionally
    quantized to `quantize` bits (MLX affine, group 64)."""
    config = shape_config(shape)
    if quantize is not None and quantize not in QUANTIZE_BITS:
        raise ValueError(f"--quantize must be one of {', '.join(map(str, QUANTIZE_BITS))}, got {quantize}")
    mx_dtype = parse_dtype(dtype or "bfloat16")
    start = time.perf_counter()
    model = build_model(config, random_weights(config, mx_dtype, seed), None)
    if quantize:
        nn.quantize(model, group_size=QUANTIZE_GROUP_SIZE, bits=quantize)
        config["quantization"] = {"group_size": QUANTIZE_GROUP_SIZE, "bits": quantize}
        for _, array in tree_flatten(model.parameters()):
            mx.eval(array)  # one matrix at a time, for Ctrl-C (qwen3-0.6b's embedding: 0.5 s)
    return LoadedModel(
        model=model,
        tokenizer=RandomTokenizer(config["vocab_size"]),
        config=config,
        name=f"random:{shape}",
        path=Path("."),
        format="random",
        quantization=f"{quantize}-bit g{QUANTIZE_GROUP_SIZE}" if quantize else (dtype or "bfloat16"),
        context_length=config["max_position_embeddings"],
        load_seconds=time.perf_counter() - start,
    )
