"""Load a GGUF file's tensors as MLX arrays named and laid out for mlx-lm / Hugging Face models.

Quantized tensors stay quantized: ``gguf_convert.py`` repacks them into MLX's affine quantized
layout (exact mode: llama.cpp's own integer codes; native-q4 mode: MLX 4-bit groups of 64).
This module maps names, builds the model config from the metadata and puts the two together.

Files are read by our memory-mapped reader (``gguf_metadata.py``); ``mx.load`` is never used on
GGUF because it silently returns wrong values for some block types (Q4_K among them).
Every float tensor (F32/F16/BF16, norms and biases included) is cast to ``dtype``, so a model
has one compute dtype; MLX's RMSNorm accumulates in float32 whatever the weight dtype.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np

from ..checks import is_whole, value_kind
from . import gguf_qwen35
from .gguf_convert import (
    GGUF_MODES,
    Placement,
    UnsupportedGGUF,
    apply_placement,
    check_dtype,
    convert_tensor,
)
from .gguf_metadata import GGUFTensor, open_gguf, read_gguf_metadata
from .gguf_names import SHARED_PER_LAYER, TOP_LEVEL

__all__ = ["GGUF_MODES", "GGUFWeights", "UnsupportedGGUF", "convert_tensor", "gguf_weights", "load_gguf"]


@dataclass
class GGUFWeights:
    config: dict  # Hugging Face config.json-style dict for the model class
    weights: dict[str, mx.array]  # Hugging Face / mlx-lm parameter names
    quantization: dict[str, dict]  # module path -> {"group_size", "bits", "mode"}
    metadata: dict  # read_gguf_metadata() result (for the tokenizer builder)
    tensor_types: dict[str, str]  # HF weight name -> GGUF type name


# --- names -----------------------------------------------------------------------------------

_PER_LAYER = {**SHARED_PER_LAYER, "ffn_norm": "post_attention_layernorm"}
_NAME = re.compile(r"(?:blk\.(\d+)\.)?(\w+)\.(weight|bias)")


def _hf_name(gguf_name: str) -> tuple[str, str]:
    """'blk.3.attn_q.weight' -> ('model.layers.3.self_attn.q_proj', 'weight')."""
    match = _NAME.fullmatch(gguf_name)
    if match:
        layer, part, leaf = match.groups()
        module = TOP_LEVEL.get(part) if layer is None else _PER_LAYER.get(part)
        if module is not None:
            return (module if layer is None else f"model.layers.{layer}.{module}"), leaf
    raise UnsupportedGGUF(f"tensor {gguf_name!r} has no counterpart in the supported models")


def _place(gguf_name: str, config: dict) -> Placement | None:
    """Where a tensor goes in the model (None: not used), per architecture."""
    if config["model_type"] in gguf_qwen35.ARCHITECTURES.values():
        return gguf_qwen35.place(gguf_name, config)
    fused = re.fullmatch(r"blk\.(\d+)\.ffn_gate_up_exps\.weight", gguf_name)
    if fused:  # --fuse-gate-up-exps: gate rows then up rows
        prefix = f"model.layers.{fused.group(1)}.mlp.switch_mlp"
        return Placement(f"{prefix}.gate_up_proj",
                         split=(f"{prefix}.gate_proj", f"{prefix}.up_proj"))
    module, leaf = _hf_name(gguf_name)
    placement = Placement(module, leaf)
    n_head = _permuted_heads(config, module)
    if n_head is not None:
        placement.rows = _unpermuted_order(n_head * config["head_dim"], n_head)
    return placement


def _permuted_heads(config: dict, module: str) -> int | None:
    """Head count of a module whose rows llama.cpp permuted (llama q/k only; qwen is not)."""
    if config["model_type"] == "llama":
        if module.endswith(".self_attn.q_proj"):
            return config["num_attention_heads"]
        if module.endswith(".self_attn.k_proj"):
            return config["num_key_value_heads"]
    return None


def _unpermuted_order(rows: int, n_head: int) -> np.ndarray:
    """The file rows of llama's attn_q / attn_k in Hugging Face order.

    The converter stores HF rows reshaped (n_head, 2, head_dim/2) with the last two axes swapped,
    i.e. gguf[h, i, j] = hf[h, j, i] on a (n_head, head_dim/2, 2) view; so hf = gguf rows taken in
    the order of that view swapped back. Works for packed codes, scales and biases alike because
    quantization groups run along columns.
    """
    return np.arange(rows).reshape(n_head, rows // n_head // 2, 2).swapaxes(1, 2).reshape(-1)


def _check_reordering(tensor: GGUFTensor, placement: Placement) -> None:
    """The rows and columns a placement takes (worked out from the metadata) must be the
    tensor's own: MLX does not bounds-check an index array, and a file whose metadata
    disagrees with its tensors would read past them (a crash, or garbage)."""
    shape = [int(n) for n in tensor.shape]
    for what, order, size in (("rows", placement.rows, shape[-1] if len(shape) > 1 else shape[0]),
                              ("columns", placement.columns, shape[0])):
        if order is None:
            continue
        if len(order) != size:
            raise UnsupportedGGUF(f"tensor {tensor.name!r} has {size} {what}, not the {len(order)} its "
                                  "model's metadata implies")
        if size and int(np.max(order)) >= size:
            raise UnsupportedGGUF(f"tensor {tensor.name!r} has {size} {what}, and its model's metadata "
                                  f"implies one past them ({int(np.max(order))})")


# --- config ----------------------------------------------------------------------------------

_ARCHITECTURES = ("llama", "qwen2", "qwen3", "qwen3moe", *gguf_qwen35.ARCHITECTURES)
_MODEL_TYPES = {"qwen3moe": "qwen3_moe"}  # GGUF architecture -> our model_type, where they differ
_REQUIRED = object()


def _meta(metadata: dict, key: str, default: Any = _REQUIRED) -> Any:
    if key in metadata:
        return metadata[key]
    if default is _REQUIRED:
        raise UnsupportedGGUF(f"GGUF metadata key {key!r} is missing")
    return default


def _whole(metadata: dict, key: str, *default: Any, minimum: int = 1) -> int:
    """A metadata value that must be a whole number of at least `minimum`."""
    value = _meta(metadata, key, *default)
    if not is_whole(value, minimum):
        shown = repr(value)
        raise UnsupportedGGUF(f"GGUF metadata {key} must be a whole number >= {minimum}, got "
                              f"{shown if len(shown) <= 40 else shown[:39] + '…'}")
    return value


def _number(metadata: dict, key: str, *default: Any, zero: bool = False) -> float:
    """A metadata value that must be a finite number > 0 (>= 0 with `zero`): a string failed
    as "could not convert string to float: 'x'" and a RoPE base of 0 as "math domain error",
    neither naming the key."""
    value = _meta(metadata, key, *default)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or value < 0 or (value == 0 and not zero):
        shown = repr(value)
        raise UnsupportedGGUF(f"GGUF metadata {key} must be a number {'>= 0' if zero else '> 0'}, got "
                              f"{shown if len(shown) <= 40 else shown[:39] + '…'}")
    return float(value)


def _check_sizes(arch: str, config: dict, tensors: dict[str, GGUFTensor]) -> None:
    """The sizes the metadata declares against the tensors the file holds, before anything is
    worked out from them: a file that declares a huge width would otherwise have row orders
    built (and a tensor indexed) at that size. (The layer count is checked against the
    weights before the model is built, loader.check_layer_count.)"""
    cols = int(tensors["token_embd.weight"].shape[0])  # GGUF shapes list columns first
    if config["hidden_size"] != cols:
        raise UnsupportedGGUF(f"GGUF metadata {arch}.embedding_length is {config['hidden_size']} but "
                              f"token_embd has {cols} columns")
    for name, heads in (("attn_q", config["num_attention_heads"]), ("attn_k", config["num_key_value_heads"])):
        tensor = tensors.get(f"blk.0.{name}.weight")
        if tensor is not None and arch not in gguf_qwen35.ARCHITECTURES:  # (qwen35's q also holds a gate)
            rows = int(tensor.shape[1])
            if rows != heads * config["head_dim"]:
                raise UnsupportedGGUF(f"tensor 'blk.0.{name}.weight' has {rows} rows, not the {heads} heads x "
                                      f"{config['head_dim']} the metadata declares")


def _build_config(metadata: dict, tensors: dict[str, GGUFTensor]) -> dict:
    arch = metadata.get("general.architecture")
    if arch not in _ARCHITECTURES:
        raise UnsupportedGGUF(f"GGUF architecture {arch!r} is not supported "
                              f"(supported: {', '.join(_ARCHITECTURES)})")
    hidden = _whole(metadata, f"{arch}.embedding_length")
    heads = _whole(metadata, f"{arch}.attention.head_count")
    kv_heads = _meta(metadata, f"{arch}.attention.head_count_kv", heads)
    if isinstance(kv_heads, list):  # per-layer counts; fine only if they are all the same
        if len(set(kv_heads)) != 1:
            raise UnsupportedGGUF(f"per-layer KV head counts {kv_heads} are not supported")
        kv_heads = kv_heads[0]
    if not is_whole(kv_heads, 1):
        raise UnsupportedGGUF(f"GGUF metadata {arch}.attention.head_count_kv must be a whole number >= 1, "
                              f"got {kv_heads!r:.40}")
    head_dim = _whole(metadata, f"{arch}.attention.key_length", hidden // heads)
    if _meta(metadata, f"{arch}.attention.value_length", head_dim) != head_dim:
        raise UnsupportedGGUF("attention key_length != value_length is not supported")
    vocab = _meta(metadata, f"{arch}.vocab_size", None)
    if vocab is None:
        tokens = _meta(metadata, "tokenizer.ggml.tokens")
        if not isinstance(tokens, list):  # (len() of a string counted its characters as tokens)
            raise UnsupportedGGUF("GGUF metadata tokenizer.ggml.tokens must be an array of strings, "
                                  f"got {value_kind(tokens)}")
        vocab = len(tokens)
    if "token_embd.weight" not in tensors:
        raise UnsupportedGGUF("tensor 'token_embd.weight' (the token embedding) is missing"
                              + ("" if tensors else ": the file holds no tensors"))
    if len(tensors["token_embd.weight"].shape) != 2:  # (an IndexError, "tuple index out of range")
        raise UnsupportedGGUF(f"tensor 'token_embd.weight' (the token embedding) has shape "
                              f"{list(tensors['token_embd.weight'].shape)}; a matrix was expected")
    embed_rows = int(tensors["token_embd.weight"].shape[1])  # GGUF shape is [cols, rows]
    if vocab != embed_rows:
        raise UnsupportedGGUF(f"vocab size {vocab} != token_embd rows {embed_rows}")
    rope_theta = _number(metadata, f"{arch}.rope.freq_base", 10000.0)
    # Our models apply no sliding window, but a value of the wrong type says the file was
    # written wrong: refused, not passed over as if the key were absent.
    if f"{arch}.attention.sliding_window" in metadata:
        _whole(metadata, f"{arch}.attention.sliding_window")
    if arch in gguf_qwen35.ARCHITECTURES:  # partial rotary embeddings and a hybrid stack
        common = {
            "hidden_size": hidden, "num_attention_heads": heads, "num_key_value_heads": kv_heads,
            "head_dim": head_dim, "vocab_size": vocab, "rope_theta": rope_theta,
            "rms_norm_eps": _number(metadata, f"{arch}.attention.layer_norm_rms_epsilon", zero=True),
            "max_position_embeddings": _whole(metadata, f"{arch}.context_length"),
            "tie_word_embeddings": "output.weight" not in tensors,
            "rope_scaling": _rope_scaling(metadata, arch, None, head_dim, rope_theta)}
        config = gguf_qwen35.build_config(metadata, tensors, arch, common, _meta)
        _check_sizes(arch, config, tensors)
        return config
    if _meta(metadata, f"{arch}.rope.dimension_count", head_dim) != head_dim:
        raise UnsupportedGGUF("partial rotary embeddings (rope.dimension_count != head_dim) "
                              "are not supported")

    config = {
        "model_type": _MODEL_TYPES.get(arch, arch),
        "hidden_size": hidden,
        "num_hidden_layers": _whole(metadata, f"{arch}.block_count"),
        "intermediate_size": _whole(metadata, f"{arch}.feed_forward_length",
                                    *([0] if arch == "qwen3moe" else []), minimum=0 if arch == "qwen3moe" else 1),
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": head_dim,
        "rms_norm_eps": _number(metadata, f"{arch}.attention.layer_norm_rms_epsilon", zero=True),
        "rope_theta": rope_theta,
        "vocab_size": vocab,
        "max_position_embeddings": _whole(metadata, f"{arch}.context_length"),
        "tie_word_embeddings": "output.weight" not in tensors,
        # Hugging Face's attention_bias puts biases on q, k, v *and* o. Qwen2 has q/k/v biases
        # by its model type and none on o, so for it the flag stays off.
        "attention_bias": arch != "qwen2" and "blk.0.attn_q.bias" in tensors,
    }
    if arch == "qwen3moe":
        # llama.cpp's qwen3moe graph routes every layer through the experts and renormalises
        # the chosen experts' weights (expert_weights_norm, when present, says so explicitly).
        config.update(num_experts=_meta(metadata, f"{arch}.expert_count"),
                      num_experts_per_tok=_meta(metadata, f"{arch}.expert_used_count"),
                      moe_intermediate_size=_meta(metadata, f"{arch}.expert_feed_forward_length"),
                      decoder_sparse_step=1, mlp_only_layers=[],
                      norm_topk_prob=bool(_meta(metadata, f"{arch}.expert_weights_norm", True)))
    _check_sizes(arch, config, tensors)
    if arch == "llama":
        config["mlp_bias"] = "blk.0.ffn_up.bias" in tensors
    rope_scaling = _rope_scaling(metadata, arch, tensors.get("rope_freqs.weight"),
                                 head_dim, rope_theta)
    if rope_scaling is not None:
        config["rope_scaling"] = rope_scaling
    return config


# rope.scaling.* keys we map (or that do not change the computation: "finetuned"), and keys we
# may ignore when they hold their neutral value.
_ROPE_KEYS_MAPPED = {"type", "factor", "original_context_length", "finetuned",
                     "yarn_beta_fast", "yarn_beta_slow"}
_ROPE_KEYS_NEUTRAL = {"attn_factor": 1.0, "yarn_attn_factor": 1.0, "yarn_log_multiplier": 0.0}


def _rope_scaling(metadata: dict, arch: str, rope_freqs: GGUFTensor | None,
                  head_dim: int, rope_theta: float) -> dict | None:
    """Map GGUF RoPE scaling to an HF ``rope_scaling`` dict (None when there is none)."""
    prefix = f"{arch}.rope.scaling."
    keys = {k[len(prefix):]: v for k, v in metadata.items() if k.startswith(prefix)}
    kind = keys.get("type", "none")

    if rope_freqs is not None:
        if arch != "llama" or kind != "none":
            raise UnsupportedGGUF(f"rope_freqs tensor with {arch} / rope scaling {kind!r} "
                                  "is not supported")
        return _llama3_rope_scaling(rope_freqs, metadata, arch, head_dim, rope_theta)
    if kind == "none":
        return None

    unmapped = [f"{prefix}{k}" for k, v in keys.items()
                if k not in _ROPE_KEYS_MAPPED and _ROPE_KEYS_NEUTRAL.get(k) != v]
    if unmapped:
        raise UnsupportedGGUF(f"RoPE scaling keys {unmapped} cannot be mapped")
    if kind == "linear":
        return {"rope_type": "linear", "factor": _number(metadata, prefix + "factor")}
    if kind == "yarn":
        scaling = {"rope_type": "yarn", "factor": _number(metadata, prefix + "factor"),
                   "original_max_position_embeddings":
                       _whole(metadata, prefix + "original_context_length")}
        if "yarn_beta_fast" in keys:
            scaling["beta_fast"] = _number(metadata, prefix + "yarn_beta_fast")
        if "yarn_beta_slow" in keys:
            scaling["beta_slow"] = _number(metadata, prefix + "yarn_beta_slow")
        return scaling
    raise UnsupportedGGUF(f"RoPE scaling type {kind!r} is not supported")


def _llama3_factors(wavelens: np.ndarray, factor: float, low: float, high: float,
                    original: float) -> np.ndarray:
    """Per-dimension wavelength multipliers of llama3 RoPE, as mlx-lm's Llama3RoPE builds them."""
    smooth = (original / wavelens - low) / (high - low)
    medium = 1.0 / ((1.0 - smooth) / factor + smooth)
    return np.where(wavelens > original / low, factor,
                    np.where(wavelens > original / high, medium, 1.0))


def _llama3_rope_scaling(rope_freqs: GGUFTensor, metadata: dict, arch: str,
                         head_dim: int, rope_theta: float) -> dict | None:
    """Recover llama3 RoPE parameters from the ``rope_freqs`` tensor.

    llama.cpp's converter does not store Llama 3.1's rope_scaling numbers; it bakes them into
    per-dimension divisors of the rotation frequency (``rope_freqs``: 1 for fast dimensions,
    ``factor`` for slow ones, 1/((1-s)/factor + s) in between, with s linear in 1/wavelength).
    mlx-lm's Llama3RoPE multiplies the same wavelengths by the same numbers, so we fit
    (factor, low_freq_factor, high_freq_factor, original context) to the tensor and check that
    they reproduce it; anything else is refused rather than run with the wrong RoPE.
    """
    got = np.asarray(rope_freqs.data, dtype=np.float64)
    wavelens = 2 * math.pi * rope_theta ** (np.arange(0, head_dim, 2) / head_dim)
    if got.shape != wavelens.shape:
        raise UnsupportedGGUF(f"rope_freqs has shape {got.shape}, expected {wavelens.shape}")
    if np.allclose(got, 1.0):
        return None
    factor = float(got.max())
    original = float(_meta(metadata, f"{arch}.rope.scaling.original_context_length", 8192))
    medium = (got > 1 + 1e-6) & (got < factor * (1 - 1e-6))
    if medium.sum() >= 2:
        # s = original / ((high - low) * wavelen) - low / (high - low): a line in 1/wavelen.
        s = (1 / got[medium] - 1 / factor) / (1 - 1 / factor)
        slope, intercept = np.polyfit(1 / wavelens[medium], s, 1)
        low = -intercept * original / slope
        high = low + original / slope
    else:  # too few points to fit: try Llama 3.1's published values
        low, high = 1.0, 4.0
    if not np.allclose(_llama3_factors(wavelens, factor, low, high, original), got, rtol=1e-4):
        raise UnsupportedGGUF("rope_freqs does not match llama3 RoPE scaling")
    return {"rope_type": "llama3", "factor": factor, "low_freq_factor": float(low),
            "high_freq_factor": float(high), "original_max_position_embeddings": int(original)}


# --- loader ----------------------------------------------------------------------------------

def load_gguf(path: str | Path, dtype: mx.Dtype = mx.float16, mode: str = "exact") -> GGUFWeights:
    """Read a llama / qwen2 / qwen3 / qwen3moe / qwen35 / qwen35moe GGUF file into config, weights and
    quantization for our model classes (llama's are mlx-lm's names and layouts).

    ``mode`` is one of ``GGUF_MODES`` (see ``gguf_convert.py``). Use:
    ``nn.quantize(model, class_predicate=lambda p, m: w.quantization.get(p, False))`` then
    ``model.load_weights(list(w.weights.items()))``.
    """
    check_dtype(dtype)
    if mode not in GGUF_MODES:
        raise ValueError(f"unknown GGUF mode {mode!r} (use one of {', '.join(GGUF_MODES)})")
    reader = open_gguf(path)
    if reader.byte_order != "I":
        raise UnsupportedGGUF(f"{path}: big-endian GGUF files are not supported")
    return gguf_weights(read_gguf_metadata(reader), reader.tensors, dtype, mode)


def gguf_weights(metadata: dict, tensor_list: list[GGUFTensor], dtype: mx.Dtype = mx.float16,
                 mode: str = "exact") -> GGUFWeights:
    """``load_gguf`` on metadata and tensors already at hand: a file's, or the random blocks
    of ``mlxserve.random_gguf`` (tensor data: numpy arrays laid out as in a file)."""
    check_dtype(dtype)
    if mode not in GGUF_MODES:
        raise ValueError(f"unknown GGUF mode {mode!r} (use one of {', '.join(GGUF_MODES)})")
    tensors = {t.name: t for t in tensor_list}
    config = _build_config(metadata, tensors)

    weights: dict[str, mx.array] = {}
    quantization: dict[str, dict] = {}
    tensor_types: dict[str, str] = {}
    for tensor in tensor_list:
        if tensor.name == "rope_freqs.weight":
            continue  # folded into config["rope_scaling"] by _build_config
        placement = _place(tensor.name, config)
        if placement is None:
            continue
        _check_reordering(tensor, placement)
        # A transform (qwen35's ssm_a -> A_log, ...) works on float32 values, then casts.
        converted = convert_tensor(tensor, mx.float32 if placement.transform else dtype, mode,
                                   columns=placement.columns, force_float=placement.force_float)
        arrays = apply_placement(placement, converted.arrays)
        if converted.bits is None:
            arrays = {"weight": arrays["weight"].astype(dtype)}
        modules = placement.split or (placement.module,)
        for i, module in enumerate(modules):  # a fused tensor: equal blocks of rows
            part = {k: mx.split(v, len(modules), axis=-2)[i] if len(modules) > 1 else v
                    for k, v in arrays.items()}
            leaf = "weight" if placement.split else placement.leaf
            if converted.bits is not None:
                quantization[module] = {"group_size": converted.group_size,
                                        "bits": converted.bits, "mode": "affine"}
                weights.update({f"{module}.{k}": v for k, v in part.items()})
            else:
                weights[f"{module}.{leaf}"] = part["weight"]
            tensor_types[f"{module}.{leaf}"] = tensor.tensor_type.name
        mx.eval(list(arrays.values()))  # one tensor's temporaries at a time
    return GGUFWeights(config, weights, quantization, metadata, tensor_types)
