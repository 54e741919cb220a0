"""Turn a model spec (folder, .gguf file, alias or Hugging Face repo id) into a ready model.

Folders in Hugging Face or MLX layout (config.json + *.safetensors, optionally MLX-quantized)
and GGUF files (read by our own reader in `quant/`) end up as the same model classes with
Hugging Face parameter names.
"""

from __future__ import annotations

import glob
import json
import logging
import re
import time
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from . import registry
from .checks import is_whole
from .models import get_family, products
from .quant import GGUF_MODES
from .tokenizer import Tokenizer, check_token_ids

log = logging.getLogger("mlxserve.loader")


class ModelLoadError(ValueError):
    """A model could not be loaded; the message is one readable line."""


@dataclass
class LoadedModel:
    model: nn.Module
    tokenizer: Tokenizer
    config: dict
    name: str
    path: Path
    format: str  # "gguf" | "safetensors"
    quantization: str  # e.g. "Q4_1", "4-bit g64", "bf16"
    context_length: int
    load_seconds: float


_DTYPES = {"float16": mx.float16, "bfloat16": mx.bfloat16, "float32": mx.float32}


def parse_dtype(name: str | None) -> mx.Dtype | None:
    if name is None:
        return None
    try:
        return _DTYPES[name]
    except KeyError:
        raise ModelLoadError(f"unknown dtype '{name}' (use one of {', '.join(_DTYPES)})") from None


def load_model(spec: str, *, dtype: mx.Dtype | None = None, progress: bool = True,
               gguf_mode: str = "exact") -> LoadedModel:
    """Load `spec`; raises ModelNotFound / ModelLoadError with one readable line.

    `gguf_mode` ("exact" or "native-q4", see quant/gguf_convert.py) applies to GGUF files only.
    """
    if gguf_mode not in GGUF_MODES:
        raise ModelLoadError(f"unknown GGUF mode '{gguf_mode}' (use one of {', '.join(GGUF_MODES)})")
    path = registry.resolve(spec, progress=progress)
    start = time.perf_counter()
    try:
        if path.is_file():  # (resolve() took a file only where it starts as GGUF does, whatever its name)
            loaded = _load_gguf(path, dtype, gguf_mode)
        elif path.is_dir():
            loaded = _load_folder(path, dtype)
        else:
            raise ModelLoadError(f"{path}: not a model folder or .gguf file")
    except (ModelLoadError, registry.ModelNotFound):
        raise
    except (ValueError, KeyError, OSError) as exc:
        raise ModelLoadError(f"cannot load {path}: {exc}") from exc
    except (TypeError, AttributeError, IndexError, ZeroDivisionError, OverflowError, RuntimeError) as exc:
        # A file whose content none of the checks above foresaw (a setting of the wrong type
        # deep in a config, MLX refusing a weight file): still one line, not a traceback.
        log.debug("loading %s failed", path, exc_info=True)
        raise ModelLoadError(f"cannot load {path}: {type(exc).__name__}: {_one_line(str(exc))}") from exc
    loaded.name = spec
    loaded.load_seconds = time.perf_counter() - start
    return loaded


def build_model(config: dict, weights: dict[str, mx.array], quantization: dict | None,
                fuse: bool = True, half_experts_on_cpu: str = "float32") -> nn.Module:
    """Instantiate the architecture named by config["model_type"] and fill its weights.

    `quantization` maps module paths to {"group_size", "bits", "mode"}; a top-level
    "group_size"/"bits" (MLX checkpoint convention) applies to every module whose
    `.scales` are present in the weights. `fuse` merges projections for speed (the
    parameter names then no longer match the checkpoint's).

    MLX's CPU back-end multiplies unquantized mixture-of-experts weights (gather_mm) only in
    float32: on the CPU such a model in float16/bfloat16 is computed in float32
    (`half_experts_on_cpu="float32"`, with a warning) or refused ("refuse": the caller asked
    for that dtype).
    """
    model_type = config.get("model_type", "?")
    family = get_family(model_type)
    try:
        args = family.ModelArgs.from_config(config)
        model = family.Model(args)
    except (TypeError, AttributeError, IndexError, KeyError, ZeroDivisionError, OverflowError) as exc:
        raise ConfigError(_config_problem(model_type, exc)) from exc
    weights = model.sanitize(weights)
    if quantization:
        defaults = {k: quantization[k] for k in ("group_size", "bits", "mode") if k in quantization}

        def predicate(path: str, module: nn.Module):
            if path in quantization and isinstance(quantization[path], dict):
                return quantization[path]
            if not hasattr(module, "to_quantized"):
                return False
            return f"{path}.scales" in weights and (defaults or False)

        nn.quantize(model, class_predicate=predicate)
    _check_parameter_names(model, weights)
    try:
        model.load_weights(list(weights.items()), strict=True)
    except ValueError as exc:  # MLX lists names one a line: keep the message on one
        raise ValueError(" ".join(str(exc).split())) from None
    half = _half_experts(model) if _on_cpu() else None
    if half is not None:
        if half_experts_on_cpu == "refuse":
            raise ValueError(f"MLX's CPU back-end computes unquantized mixture-of-experts layers only in "
                             f"float32, not {half}: use --dtype float32 (or leave --dtype out)")
        log.warning("MLX's CPU back-end computes unquantized mixture-of-experts layers only in float32: "
                    "computing this %s model in float32", half)
        # Before fuse(): fused modules keep references to the parameters they were made from.
        model.set_dtype(mx.float32)
    if fuse and hasattr(model, "fuse"):
        model.fuse()
    if products.enabled:
        products.use_conv_products(model)
    # Arrays modules keep besides their parameters (mlx-lm's Llama 3 RoPE keeps its
    # frequencies as `_freqs`) too: a lazy array made on this thread cannot be evaluated on
    # the engine's (MLX's streams belong to their thread), which failed its first step.
    private = [v for m in model.modules() for k, v in m.items() if k.startswith("_") and isinstance(v, mx.array)]
    mx.eval(model.parameters(), private)
    return model


class ConfigError(ValueError):
    """A model config (config.json, or the one built from GGUF metadata) that the model
    class cannot be built from; the message says what is wrong with it."""


_MISSING_ARGS = re.compile(r"missing \d+ required (?:positional |keyword-only )?arguments?: (.+)")


def _config_problem(model_type: str, exc: Exception) -> str:
    missing = _MISSING_ARGS.search(str(exc))
    if missing:  # the dataclass's own message: "ModelArgs.__init__() missing 5 required ..."
        names = re.sub(r",? and ", ", ", missing[1])
        return f"lacks {'settings' if ',' in names else 'the setting'} {names}, which model_type '{model_type}' needs"
    return f"does not fit model_type '{model_type}' ({type(exc).__name__}: {_one_line(str(exc))})"


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _read_config(config_file: Path) -> dict:
    try:
        config = json.loads(config_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ModelLoadError(f"{config_file}: not valid JSON ({exc})") from None
    if not isinstance(config, dict):
        raise ModelLoadError(f"{config_file}: expected a JSON object of settings, not {_json_kind(config)}")
    return config


def _json_kind(value) -> str:
    kinds = {list: "an array", str: "a string", bool: "true/false", int: "a number", float: "a number"}
    return "null" if value is None else kinds.get(type(value), type(value).__name__)


def _load_weights_file(f: str) -> dict[str, mx.array]:
    try:
        return mx.load(f)
    except (RuntimeError, ValueError) as exc:  # MLX: "[load_safetensors] Invalid json header length file …"
        detail = re.sub(r"^\[\w+\]\s*", "", _one_line(str(exc))).removesuffix(f" file {f}")
        raise ModelLoadError(f"{f}: not a readable safetensors file ({detail})") from None


def _load_folder(path: Path, dtype: mx.Dtype | None) -> LoadedModel:
    config_file = path / "config.json"
    if not config_file.exists():
        raise ModelLoadError(f"{path}: no config.json (not a Hugging Face / MLX model folder)")
    config = _read_config(config_file)
    files = sorted(glob.glob(str(path / "*.safetensors")))
    if not files:
        raise ModelLoadError(f"{path}: no *.safetensors weight files")
    weights: dict[str, mx.array] = {}
    for f in files:
        if not Path(f).is_file():  # (mx.load would wait on a FIFO for ever)
            raise ModelLoadError(f"{f}: not a regular file")
        weights.update(_load_weights_file(f))
    check_layer_count(config.get("text_config") or config, weights, f"{config_file}: num_hidden_layers")
    _check_settings(config, config_file)
    if dtype is not None:
        # Quantization scales/biases are cast too: they set the compute dtype of their layer.
        weights = {k: v.astype(dtype) if _is_float(v) else v for k, v in weights.items()}
    quantization = config.get("quantization") or config.get("quantization_config")
    if quantization and quantization.get("quant_method") not in (None, "mlx"):
        raise ModelLoadError(
            f"{path}: quantization method '{quantization.get('quant_method')}' is not supported "
            "(use an MLX-quantized, bf16/fp16/fp32 or GGUF model)"
        )
    try:
        model = build_model(config, weights, quantization,
                            half_experts_on_cpu="float32" if dtype is None else "refuse")
    except ConfigError as exc:
        raise ModelLoadError(f"{config_file} {exc}") from exc
    context = config.get("max_position_embeddings") or (config.get("text_config") or {}).get("max_position_embeddings")
    if context is not None and not is_whole(context, 1):
        raise ModelLoadError(f"{config_file}: max_position_embeddings must be a whole number >= 1, got {context!r:.40}")
    tokenizer = Tokenizer.from_folder(path)
    generation_file = path / "generation_config.json"
    vocab_size = (config.get("text_config") or config).get("vocab_size")
    if generation_file.is_file() and is_whole(vocab_size, 1):  # (valid JSON: the tokenizer has read it)
        check_token_ids(f"{generation_file}: eos_token_id",
                        json.loads(generation_file.read_text(encoding="utf-8")).get("eos_token_id"),
                        vocab_size, ModelLoadError)
    return LoadedModel(
        model=model,
        tokenizer=tokenizer,
        config=config,
        name=str(path),
        path=path,
        format="safetensors",
        quantization=_describe_quantization(quantization, model),
        context_length=context or 4096,
        load_seconds=0.0,
    )


def _check_settings(config: dict, config_file: Path) -> None:
    """Settings the model classes take on trust: a string rope_scaling failed as an
    AttributeError deep in the RoPE set-up, and an eos_token_id past the vocabulary ends no
    answer."""
    text = config.get("text_config") or config
    vocab_size = text.get("vocab_size")
    places = [(config, "")] + ([(text, "text_config.")] if text is not config else [])
    for settings, prefix in places:
        for name in ("rope_scaling", "rope_parameters"):
            value = settings.get(name)
            if value is not None and not isinstance(value, dict):
                raise ModelLoadError(f"{config_file}: {prefix}{name} must be an object of RoPE settings "
                                     f'(e.g. {{"rope_type": "linear", "factor": 2.0}}), got {value!r:.40}')
        if is_whole(vocab_size, 1):  # (else the model class names the problem)
            check_token_ids(f"{config_file}: {prefix}eos_token_id", settings.get("eos_token_id"),
                            vocab_size, ModelLoadError)


def _load_gguf(path: Path, dtype: mx.Dtype | None, mode: str) -> LoadedModel:
    from .quant.gguf import load_gguf
    from .quant.gguf_metadata import GGUFFormatError

    try:
        gguf = load_gguf(path, dtype=dtype or default_gguf_dtype(), mode=mode)
    except GGUFFormatError as exc:  # a truncated or garbled file: the message names it already
        raise ModelLoadError(str(exc)) from None
    check_layer_count(gguf.config, gguf.weights, f"{path}: its metadata's block_count")
    try:
        model = build_model(gguf.config, gguf.weights, gguf.quantization,
                            half_experts_on_cpu="float32" if dtype is None else "refuse")
    except ConfigError as exc:
        raise ModelLoadError(f"{path}: the model config its metadata gives {exc}") from exc
    tokenizer = Tokenizer.from_gguf_metadata(gguf.metadata)
    return LoadedModel(
        model=model,
        tokenizer=tokenizer,
        config=gguf.config,
        name=str(path),
        path=path,
        format="gguf",
        quantization=_describe_gguf(path, gguf.tensor_types)
        + (" as MLX 4-bit g64" if mode == "native-q4" else ""),
        context_length=int(gguf.config.get("max_position_embeddings") or 4096),
        load_seconds=0.0,
    )


_LAYER_WEIGHT = re.compile(r"(?:^|\.)layers\.(\d+)\.")


def check_layer_count(config: dict, weights: dict[str, mx.array], setting: str) -> None:
    """The layer count a config declares against the layers its weights hold, before the
    model is built: a config that declares a million layers would build them all first (and
    run out of memory) only to find their weights missing."""
    declared = config.get("num_hidden_layers")
    if declared is None:
        return  # (the model class names what is missing)
    if not is_whole(declared, 1):
        raise ModelLoadError(f"{setting} must be a whole number >= 1, got {declared!r:.40}")
    held = 1 + max((int(m[1]) for name in weights if (m := _LAYER_WEIGHT.search(name))), default=-1)
    if declared > held:
        raise ModelLoadError(f"{setting} is {declared}, but the weights hold {held} layers")


def default_gguf_dtype() -> mx.Dtype:
    """GGUF block scales are float16 numbers, so float16 holds them exactly and is the fast
    type on GPUs; MLX's CPU back-end runs float16 matmuls ~40x slower than float32, so on
    the CPU we use float32 (equally exact)."""
    return mx.float32 if mx.default_device() == mx.cpu else mx.float16


def _on_cpu() -> bool:
    return mx.default_device() == mx.cpu


def _half_experts(model: nn.Module) -> str | None:
    """The dtype name of the model's unquantized expert weights when half precision (which
    MLX's gather_mm runs only on a GPU), else None."""
    from mlx_lm.models.switch_layers import SwitchLinear

    for _, module in model.named_modules():
        if isinstance(module, SwitchLinear) and module.weight.dtype in (mx.float16, mx.bfloat16):
            return str(module.weight.dtype).split(".")[-1]
    return None


def _check_parameter_names(model: nn.Module, weights: dict[str, mx.array]) -> None:
    """One line naming (some of) the parameters the checkpoint lacks or has in excess."""
    expected = {name for name, _ in tree_flatten(model.parameters())}
    missing, extra = sorted(expected - weights.keys()), sorted(weights.keys() - expected)
    problems = []
    if missing:
        problems.append(f"{len(missing)} parameter(s) missing from the weights: {_some(missing)}")
    if extra:
        problems.append(f"{len(extra)} weight(s) the model has no parameter for: {_some(extra)}")
    if problems:
        raise ValueError("; ".join(problems))


def _some(names: list[str], shown: int = 4) -> str:
    return ", ".join(names[:shown]) + (f" and {len(names) - shown} more" if len(names) > shown else "")


def _is_float(a: mx.array) -> bool:
    return mx.issubdtype(a.dtype, mx.floating)


def _describe_gguf(path: Path, tensor_types: dict[str, str]) -> str:
    """llama.cpp's name for the file's mix (general.file_type) or, when the file does not
    say, the quantized tensor types it holds."""
    name = registry.gguf_quantization(path)
    if name != "unknown":
        return name
    quantized = sorted({t for t in tensor_types.values() if t not in ("F32", "F16", "BF16")})
    return "+".join(quantized) or "+".join(sorted(set(tensor_types.values())))


def _describe_quantization(quantization: dict | None, model: nn.Module) -> str:
    """The checkpoint's quantization, or the float types of the parameters the model holds:
    not of weights it dropped (a Qwen3.5 checkpoint's vision tower and MTP block)."""
    if quantization and "bits" in quantization:
        return f"{quantization['bits']}-bit g{quantization.get('group_size', 64)}"
    float_dtypes = {str(v.dtype).split(".")[-1] for _, v in tree_flatten(model.parameters()) if _is_float(v)}
    return "/".join(sorted(float_dtypes)) or "unknown"
