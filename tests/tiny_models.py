"""Tiny random checkpoints in Hugging Face layout, shared by every test module.

`make_tiny_model(folder, arch=...)` writes config.json, model.safetensors, tokenizer.json,
tokenizer_config.json (with a ChatML template) and generation_config.json. Weights are
random but seeded, with a spread large enough that greedy decoding has clear margins.
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten

import gguf
from gguf import GGMLQuantizationType as T

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>", "<tool_call>", "</tool_call>"]
CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
CORPUS = [
    "The capital of France is Paris. The sky is blue because of Rayleigh scattering.",
    "def add(a, b):\n    return a + b\n\nprint(add(1, 2))",
    "Once upon a time there was a tiny model that generated text one token at a time.",
    "Numbers: 0 1 2 3 4 5 6 7 8 9 10 100 1000. Unicode: café, naïve, 東京, 😀.",
    "Hello world! How are you today? I am fine, thank you.",
]

ARCH_CONFIGS = {
    "qwen3": dict(model_type="qwen3", head_dim=32, tie_word_embeddings=True, rope_theta=1000000.0),
    "llama": dict(model_type="llama", tie_word_embeddings=False, rope_theta=10000.0),
    "qwen2": dict(model_type="qwen2", tie_word_embeddings=False, rope_theta=1000000.0),
    # Llama 3.1's RoPE scaling: not plain RoPE, so its attention projects without the fused
    # norm-and-RoPE pass (llama.Attention.project's other path).
    "llama3": dict(model_type="llama", tie_word_embeddings=False, rope_theta=500000.0,
                   rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                 "high_freq_factor": 4.0, "original_max_position_embeddings": 256}),
    # Qwen3 stretched by YaRN (how Qwen documents its long-context use): the unfused path too.
    "qwen3_yarn": dict(model_type="qwen3", head_dim=32, tie_word_embeddings=True, rope_theta=1000000.0,
                       rope_scaling={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 512}),
}
# Qwen3.5 (hybrid): 2 linear-attention + 2 full-attention layers, in Hugging Face's nested
# layout (written by `_hf_qwen3_5_layout`), dense and mixture-of-experts.
_QWEN3_5 = dict(
    head_dim=32, tie_word_embeddings=True, num_hidden_layers=4, full_attention_interval=2,
    layer_types=["linear_attention", "full_attention", "linear_attention", "full_attention"],
    linear_num_value_heads=4, linear_num_key_heads=2, linear_key_head_dim=32,
    linear_value_head_dim=16, linear_conv_kernel_dim=4,
    rope_parameters={"rope_type": "default", "rope_theta": 10000000.0,
                     "partial_rotary_factor": 0.25, "mrope_section": [2, 1, 1]},
)
ARCH_CONFIGS["qwen3_5"] = dict(_QWEN3_5, model_type="qwen3_5")
ARCH_CONFIGS["qwen3_5_moe"] = dict(_QWEN3_5, model_type="qwen3_5_moe", num_experts=4, num_experts_per_tok=2,
                                   moe_intermediate_size=32, shared_expert_intermediate_size=32)
# 8 value heads of 32 over 2 key heads: llama.cpp's GGUF value-head reordering is then not its
# own inverse, and ssm_out (256 columns) and down_proj can hold 256-value K-quant blocks.
_WIDE_V = dict(linear_num_value_heads=8, linear_value_head_dim=32)
ARCH_CONFIGS["qwen3_5_v8"] = dict(ARCH_CONFIGS["qwen3_5"], **_WIDE_V, intermediate_size=256)
ARCH_CONFIGS["qwen3_5_moe_v8"] = dict(ARCH_CONFIGS["qwen3_5_moe"], **_WIDE_V)
# Qwen3-MoE: every layer sparse (as llama.cpp's qwen3moe needs), and a variant whose first
# layer is a dense MLP (mlp_only_layers). Experts are written per expert, as Hugging Face does.
ARCH_CONFIGS["qwen3_moe"] = dict(model_type="qwen3_moe", head_dim=32, tie_word_embeddings=False,
                                 rope_theta=1000000.0, num_experts=8, num_experts_per_tok=2,
                                 moe_intermediate_size=32, decoder_sparse_step=1,
                                 mlp_only_layers=[], norm_topk_prob=True)
ARCH_CONFIGS["qwen3_moe_mixed"] = dict(ARCH_CONFIGS["qwen3_moe"], mlp_only_layers=[0])


@lru_cache(maxsize=1)
def tiny_tokenizer_json() -> str:
    """A byte-level BPE trained on CORPUS (deterministic), serialized as tokenizer.json."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS * 4, trainer)
    return tok.to_str()


def make_tiny_model(
    folder: Path,
    arch: str = "qwen3",
    *,
    dtype: str = "float32",
    quantize_bits: int | None = None,
    hidden_size: int = 64,
    num_layers: int = 2,
    seed: int = 0,
    max_position_embeddings: int = 2048,
) -> Path:
    """Write a tiny random model of `arch` into `folder` and return the folder."""
    from mlxserve.loader import build_model

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer_json = tiny_tokenizer_json()
    vocab_size = len(json.loads(tokenizer_json)["model"]["vocab"]) + len(SPECIAL_TOKENS)
    vocab_size = -(-vocab_size // 64) * 64  # room for every id, MLX-quantizable
    config = dict(
        hidden_size=hidden_size,
        num_hidden_layers=num_layers,
        intermediate_size=hidden_size * 2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=vocab_size,
        rms_norm_eps=1e-6,
        max_position_embeddings=max_position_embeddings,
        eos_token_id=2,
        bos_token_id=None,
        torch_dtype=dtype,
    )
    config.update(ARCH_CONFIGS[arch])
    model = build_model(dict(config), _random_weights(config, seed), None, fuse=False)
    if quantize_bits:
        nn.quantize(model, group_size=32, bits=quantize_bits)
        config["quantization"] = {"group_size": 32, "bits": quantize_bits}
    weights = dict(tree_flatten(model.parameters()))
    if not quantize_bits or dtype != "float32":
        weights = {k: v.astype(getattr(mx, dtype)) if mx.issubdtype(v.dtype, mx.floating) else v
                   for k, v in weights.items()}
    if arch.startswith("qwen3_5"):
        config, weights = _hf_qwen3_5_layout(config, weights)
    if arch.startswith("qwen3_moe") and not quantize_bits:
        weights = _hf_per_expert_layout(weights)
    mx.save_safetensors(str(folder / "model.safetensors"), weights, metadata={"format": "mlx"})
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    (folder / "tokenizer.json").write_text(tokenizer_json)
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "chat_template": CHATML_TEMPLATE,
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "bos_token": None,
        "add_bos_token": False,
        "model_max_length": max_position_embeddings,
        "tokenizer_class": "PreTrainedTokenizerFast",
    }))
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": [0, 2]}))
    return folder


def _hf_qwen3_5_layout(config: dict, weights: dict) -> tuple[dict, dict]:
    """Our Qwen3.5 parameters as a Hugging Face checkpoint stores them: a nested text_config,
    `model.language_model.*` names, zero-centred norms, conv1d as [C, 1, K], experts stacked
    with gate and up in one tensor, plus vision and MTP weights the loader must ignore."""
    zero_centred = (".input_layernorm.weight", ".post_attention_layernorm.weight",
                    "model.norm.weight", ".q_norm.weight", ".k_norm.weight")
    out = {}
    for name, value in weights.items():
        if name.endswith(zero_centred):
            value = value - 1.0
        if name.endswith("conv1d.weight"):
            value = value.moveaxis(2, 1)
        out[name.replace("model.", "model.language_model.", 1) if name.startswith("model.") else name] = value
    for layer in range(config["num_hidden_layers"]):
        prefix = f"model.language_model.layers.{layer}.mlp"
        if f"{prefix}.switch_mlp.gate_proj.weight" in out:
            gate = out.pop(f"{prefix}.switch_mlp.gate_proj.weight")
            up = out.pop(f"{prefix}.switch_mlp.up_proj.weight")
            out[f"{prefix}.experts.gate_up_proj"] = mx.concatenate([gate, up], axis=-2)
            out[f"{prefix}.experts.down_proj"] = out.pop(f"{prefix}.switch_mlp.down_proj.weight")
    out["model.visual.patch_embed.proj.weight"] = mx.zeros((4, 4))
    out["mtp.layers.0.mlp.gate_proj.weight"] = mx.zeros((4, 4))
    top = {k: config.pop(k) for k in ("model_type", "tie_word_embeddings", "eos_token_id", "bos_token_id",
                                      "torch_dtype", "quantization") if k in config}
    text = dict(config, model_type=top["model_type"] + "_text", tie_word_embeddings=top["tie_word_embeddings"])
    return dict(top, architectures=["Qwen3_5ForConditionalGeneration"], text_config=text,
                vision_config={"depth": 1}), out


def _hf_per_expert_layout(weights: dict) -> dict:
    """Stacked `mlp.switch_mlp.{proj}.weight` [E, out, in] -> Hugging Face's
    `mlp.experts.{e}.{proj}.weight`, one tensor per expert."""
    out = {}
    for name, value in weights.items():
        if ".mlp.switch_mlp." in name:
            stem, proj_leaf = name.split(".mlp.switch_mlp.")
            for e in range(value.shape[0]):
                out[f"{stem}.mlp.experts.{e}.{proj_leaf}"] = value[e]
        else:
            out[name] = value
    return out


def _random_weights(config: dict, seed: int) -> dict[str, mx.array]:
    """Seeded random parameters with the names the model classes expect."""
    from mlxserve.models import get_family

    family = get_family(config["model_type"])
    model = family.Model(family.ModelArgs.from_config(config))
    rng = np.random.default_rng(seed)
    weights = {}
    for name, param in tree_flatten(model.parameters()):
        if "norm" in name:
            values = 1.0 + 0.1 * rng.standard_normal(param.shape)
        elif name.endswith("bias"):
            values = 0.1 * rng.standard_normal(param.shape)
        else:
            fan_in = param.shape[-1]
            values = rng.standard_normal(param.shape) * (1.5 / np.sqrt(fan_in))
        weights[name] = mx.array(values.astype(np.float32))
    return weights


# ---- GGUF ------------------------------------------------------------------------------------

FLOAT_GGUF_TYPES = (T.F32, T.F16)  # written as plain numpy arrays; every other type as raw bytes
TO_GGUF = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output",
           "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
           "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
           "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
           "self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm",
           "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}


def write_gguf(path: Path, arch: str, kv: dict, tensors: dict[str, tuple[np.ndarray, T]]) -> Path:
    """tensors: GGUF name -> (data as gguf.quants.quantize returns it, its type)."""
    writer = gguf.GGUFWriter(str(path), arch)
    for key, value in kv.items():
        if isinstance(value, bool):
            writer.add_bool(key, value)
        elif isinstance(value, int):
            writer.add_uint32(key, value)
        elif isinstance(value, float):
            writer.add_float32(key, value)
        elif isinstance(value, str):
            writer.add_string(key, value)
        else:
            writer.add_array(key, value)
    for name, (data, qtype) in tensors.items():
        writer.add_tensor(name, data, raw_dtype=None if qtype in FLOAT_GGUF_TYPES else qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def to_gguf_name(hf: str) -> str:
    module, leaf = hf.rsplit(".", 1)
    if module.startswith("model.layers."):
        _, _, layer, rest = module.split(".", 3)
        return f"blk.{layer}.{TO_GGUF[rest]}.{leaf}"
    return f"{TO_GGUF[module]}.{leaf}"


def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """The row permutation llama.cpp's convert_hf_to_gguf.py applies to llama q/k weights."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(
        w.shape)



def gguf_tokenizer_metadata(tokenizer_json: str, chat_template: str = CHATML_TEMPLATE) -> dict:
    """tokenizer.ggml.* metadata for a byte-level BPE tokenizer.json, as llama.cpp writes it."""
    spec = json.loads(tokenizer_json)
    vocab = dict(spec["model"]["vocab"])
    for added in spec.get("added_tokens", []):
        vocab[added["content"]] = added["id"]
    tokens = [None] * len(vocab)
    for piece, i in vocab.items():
        tokens[i] = piece
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]]
    return {
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": "gpt-2",
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": [3 if t in SPECIAL_TOKENS else 1 for t in tokens],
        "tokenizer.ggml.merges": merges,
        "tokenizer.ggml.eos_token_id": 2,
        "tokenizer.ggml.padding_token_id": 0,
        "tokenizer.chat_template": chat_template,
    }


def add_tokenizer_metadata(writer, tokenizer_json: str, vocab_size: int, pre: str | None = None) -> None:
    """Write a tokenizer.json's tokenizer.ggml.* keys with a gguf.GGUFWriter, the vocabulary
    padded to the model's size as llama.cpp's converter pads it (`pre`: the pre-tokenizer name
    to write instead of the default)."""
    meta = gguf_tokenizer_metadata(tokenizer_json)
    pad = vocab_size - len(meta["tokenizer.ggml.tokens"])
    writer.add_tokenizer_model(meta["tokenizer.ggml.model"])
    writer.add_tokenizer_pre(pre or meta["tokenizer.ggml.pre"])
    writer.add_token_list(meta["tokenizer.ggml.tokens"] + [f"[PAD{i}]" for i in range(pad)])
    writer.add_token_types(meta["tokenizer.ggml.token_type"] + [gguf.TokenType.UNUSED] * pad)
    writer.add_token_merges(meta["tokenizer.ggml.merges"])
    writer.add_eos_token_id(meta["tokenizer.ggml.eos_token_id"])
    writer.add_pad_token_id(meta["tokenizer.ggml.padding_token_id"])
    writer.add_chat_template(meta["tokenizer.chat_template"])


# ---- reference computations -------------------------------------------------------------------

def prompt_logits(loaded, ids, block_size: int = 16):
    """float32 logits [len(ids), vocab] of one forward pass over ``ids`` in a fresh row (a
    hybrid model's recurrent state accounted as the engine does)."""
    import mlx.core as mx

    from mlxserve.cache import KVStore, RowCache
    from mlxserve.runner import Feed, Runner

    model = loaded.model
    layers, heads, dim = model.kv_shape()
    state = model.state_bytes_per_row() if hasattr(model, "state_bytes_per_row") else 0
    kv = KVStore(layers, heads, dim, mx.float32, block_size=block_size, state_bytes_per_row=state)
    row = RowCache(kv)
    row.reserve(len(ids))
    logits, _ = Runner(model, kv).forward([Feed("r", list(ids), 0, row, "all")])
    return logits.astype(mx.float32)


@contextmanager
def float32_rope():
    """Within it, mx.fast.rope computes in float32 whatever its input's dtype, as MLX's GPU
    kernels do (and mlxserve's fused RoPE, models/llama.RotaryNorm, on every back-end).
    MLX's CPU fallback rounds the angles' cos and sin to a float16/bfloat16 input's dtype
    first: for references in half precision on the CPU, that is not the same math."""
    rope = mx.fast.rope

    def in_float32(x, *args, **kwargs):
        return rope(x.astype(mx.float32), *args, **kwargs).astype(x.dtype)

    mx.fast.rope = in_float32
    try:
        yield
    finally:
        mx.fast.rope = rope


def reference_prompt_logprobs(loaded, prompt):
    """log p(prompt[i+1] | prompt[:i+1]) from one direct forward pass over the whole prompt."""
    import mlx.core as mx

    logits = prompt_logits(loaded, prompt)
    return logits - mx.logsumexp(logits, axis=-1, keepdims=True)


def make_tiny_dflash_draft(folder: Path, target, *, layer_ids=(0,), block_size: int = 8, seed: int = 3) -> Path:
    """Write a random DFlash draft for `target` (a loaded model module) into `folder`, in
    z-lab's checkpoint layout (config.json with dflash_config, model.safetensors)."""
    from mlxserve.spec.dflash import DFlashConfig, DFlashDraft

    args = target.args
    config = DFlashConfig(hidden_size=args.hidden_size, num_hidden_layers=2, num_attention_heads=4,
                          num_key_value_heads=2, head_dim=16, intermediate_size=96, vocab_size=args.vocab_size,
                          target_layer_ids=tuple(layer_ids), mask_token_id=args.vocab_size - 1,
                          block_size=block_size, rope_theta=10000.0, layer_types=("full_attention",) * 2)
    draft = DFlashDraft(config)
    rng = np.random.default_rng(seed)
    weights = {name: mx.array(rng.normal(1.0 if name.endswith("norm.weight") else 0.0,
                                         0.1 if name.endswith("norm.weight") else 0.2, value.shape).astype(np.float32))
               for name, value in tree_flatten(draft.parameters())}
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps({
        "architectures": ["DFlashDraftModel"], "model_type": "qwen3", "block_size": block_size,
        "hidden_size": config.hidden_size, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "head_dim": 16, "intermediate_size": 96, "vocab_size": config.vocab_size,
        "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "max_position_embeddings": 2048,
        "num_target_layers": len(target.model.layers), "layer_types": ["full_attention"] * 2,
        "dflash_config": {"mask_token_id": config.mask_token_id, "target_layer_ids": list(layer_ids)}}))
    mx.save_safetensors(str(folder / "model.safetensors"), weights)
    return folder
