"""Qwen3.5 GGUF files (``qwen35``, ``qwen35moe``) -> config and parameters of ``models/qwen3_5.py``.

What llama.cpp's converter does to a Hugging Face Qwen3.5 checkpoint (``convert_hf_to_gguf.py``,
later ``conversion/qwen.py``: ``Qwen3NextModel``, ``_LinearAttentionVReorderBase``,
``_Qwen35MtpMixin``), and how each step is undone here:

- Zero-centred RMSNorm weights are stored with the 1 already added: every ``*norm.weight`` but
  the linear-attention gated norm (``attn_norm``, ``post_attention_norm``, ``output_norm``,
  ``attn_q_norm``, ``attn_k_norm``). That is the mlx-lm layout our model's ``sanitize``
  recognises (conv1d as [C, K, 1]), so these are used as they are; ``ssm_norm`` is w itself in
  both layouts.
- ``A_log`` is stored as ``ssm_a`` = -exp(A_log), float32, without ``.weight``; we take
  A_log = log(-ssm_a), computed in float64 (so exp(A_log) is the file's value to float32
  precision).
- ``dt_bias`` -> ``ssm_dt.bias``; conv1d [C, 1, K] -> ``ssm_conv1d`` [C, K] (MLX wants [C, K, 1]).
- ``in_proj_qkv`` / ``in_proj_z`` / ``in_proj_a`` / ``in_proj_b`` / ``out_proj`` ->
  ``attn_qkv`` / ``attn_gate`` / ``ssm_alpha`` / ``ssm_beta`` / ``ssm_out``.
- With more value heads than key heads (r = n_v / n_k > 1), value heads are stored in "tiled"
  order (file head j * n_k + k is value head j of key head k) instead of Hugging Face's grouped
  order (k * r + j): in the V rows of ``attn_qkv`` and ``ssm_conv1d``, the rows of
  ``attn_gate``, ``ssm_alpha``, ``ssm_beta``, the entries of ``ssm_a`` and ``ssm_dt``, and the
  columns of ``ssm_out``. We take rows / columns back in grouped order.
- ``attn_q`` keeps q_proj as it is: per head, the query then the output gate.
- Experts: ``ffn_{gate,up,down}_exps`` [experts, rows, cols] (or ``ffn_gate_up_exps``, gate
  rows then up rows), router ``ffn_gate_inp``, shared expert ``ffn_*_shexp`` and its gate
  ``ffn_gate_inp_shexp``.
- A multi-token-prediction block may follow the trunk as extra ``blk.N``
  (``nextn_predict_layers`` of them: trunk depth = ``block_count`` - that); it is skipped.

Metadata: ``ssm.state_size`` = key head dim, ``ssm.group_count`` = key heads,
``ssm.time_step_rank`` = value heads, ``ssm.inner_size`` = value head dim x value heads,
``ssm.conv_kernel``; ``full_attention_interval`` (layer i is full attention when
(i + 1) % interval == 0, as llama.cpp's loader decides); ``rope.dimension_count`` = the rotated
dims per head (head_dim x partial_rotary_factor); ``rope.dimension_sections`` = mrope_section
padded to 4 (text positions make it plain RoPE over those dims).
"""

from __future__ import annotations

import logging
import re

import numpy as np

from ..checks import is_whole
from .gguf_convert import Placement, UnsupportedGGUF
from .gguf_names import SHARED_PER_LAYER, TOP_LEVEL

log = logging.getLogger("mlxserve.quant")

# GGUF architecture -> our model_type
ARCHITECTURES = {"qwen35": "qwen3_5", "qwen35moe": "qwen3_5_moe"}

_PER_LAYER = {
    **SHARED_PER_LAYER,
    "post_attention_norm": "post_attention_layernorm",
    "attn_qkv": "linear_attn.in_proj_qkv",
    "attn_gate": "linear_attn.in_proj_z",
    "ssm_alpha": "linear_attn.in_proj_a",
    "ssm_beta": "linear_attn.in_proj_b",
    "ssm_out": "linear_attn.out_proj",
    "ssm_conv1d": "linear_attn.conv1d",
    "ssm_norm": "linear_attn.norm",
    "ffn_gate_shexp": "mlp.shared_expert.gate_proj",
    "ffn_up_shexp": "mlp.shared_expert.up_proj",
    "ffn_down_shexp": "mlp.shared_expert.down_proj",
    "ffn_gate_inp_shexp": "mlp.shared_expert_gate",
}
_BLOCK = re.compile(r"blk\.(\d+)\.(.+)")


def build_config(metadata: dict, tensors: dict, arch: str, common: dict, meta) -> dict:
    """Our qwen3_5 config from the file's metadata; ``common`` holds the fields every
    architecture shares (hidden size, heads, vocab, ...), ``meta`` reads a required key."""
    def key(name, *default, minimum=None):
        value = meta(metadata, f"{arch}.{name}", *default)
        if minimum is not None and not is_whole(value, minimum):
            raise UnsupportedGGUF(f"GGUF metadata {arch}.{name} must be a whole number >= {minimum}, "
                                  f"got {value!r}")
        return value

    block_count = key("block_count", minimum=1)
    nextn = key("nextn_predict_layers", 0, minimum=0)
    layers = block_count - nextn
    if layers < 1:
        raise UnsupportedGGUF(f"GGUF metadata {arch}.nextn_predict_layers ({nextn}) leaves no layers "
                              f"of {arch}.block_count ({block_count}) for the model itself")
    interval = key("full_attention_interval", 4, minimum=1)
    head_dim = common["head_dim"]
    if not is_whole(head_dim, 1):
        raise UnsupportedGGUF(f"GGUF metadata {arch}.attention.key_length must be a whole number >= 1, "
                              f"got {head_dim!r}")
    rope_dims = key("rope.dimension_count", head_dim, minimum=2)
    if rope_dims > head_dim or rope_dims % 2:
        raise UnsupportedGGUF(f"GGUF metadata {arch}.rope.dimension_count ({rope_dims}) must be an even "
                              f"number of dims up to the head size ({head_dim})")
    factor = rope_dims / head_dim
    if int(head_dim * factor) != rope_dims:
        raise UnsupportedGGUF(f"rope.dimension_count {rope_dims} is not a fraction of "
                              f"head_dim {head_dim} that partial_rotary_factor can express")
    n_v, n_k = key("ssm.time_step_rank", minimum=1), key("ssm.group_count", minimum=1)
    inner = key("ssm.inner_size", minimum=1)
    if n_v % n_k or inner % n_v:
        raise UnsupportedGGUF(f"linear attention with {n_v} value heads, {n_k} key heads and "
                              f"inner size {inner} is not a grouped layout")
    rope = {"rope_type": "default", "rope_theta": common.pop("rope_theta"),
            "partial_rotary_factor": factor}
    sections = list(key("rope.dimension_sections", []))
    while sections and sections[-1] == 0:
        sections.pop()
    if sections:
        rope["mrope_section"] = sections
    rope.update(common.pop("rope_scaling") or {})  # YaRN / linear, as for the other families
    config = dict(common, model_type=ARCHITECTURES[arch], num_hidden_layers=layers,
                  intermediate_size=key("feed_forward_length", 0),
                  linear_num_value_heads=n_v, linear_num_key_heads=n_k,
                  linear_key_head_dim=key("ssm.state_size", minimum=1),
                  linear_value_head_dim=inner // n_v,
                  linear_conv_kernel_dim=key("ssm.conv_kernel", minimum=1),
                  full_attention_interval=interval,
                  layer_types=["full_attention" if (i + 1) % interval == 0 else "linear_attention"
                               for i in range(layers)],
                  rope_parameters=rope)
    full = next((i for i, t in enumerate(config["layer_types"]) if t == "full_attention"), None)
    config["attention_bias"] = full is not None and f"blk.{full}.attn_q.bias" in tensors
    if arch == "qwen35moe":
        if not any(name.endswith("ffn_gate_inp_shexp.weight") for name in tensors):
            raise UnsupportedGGUF("qwen35moe files without a shared expert are not supported")
        config.update(num_experts=key("expert_count"), num_experts_per_tok=key("expert_used_count"),
                      moe_intermediate_size=key("expert_feed_forward_length"),
                      shared_expert_intermediate_size=key("expert_shared_feed_forward_length"),
                      # llama.cpp's qwen35moe graph renormalises the chosen experts' weights
                      # (build_moe_ffn with norm_w = true); the file has no key for it.
                      norm_topk_prob=True)
    if nextn:
        log.info("ignoring the file's %d multi-token-prediction block(s) (blk.%d...)",
                 nextn, layers)
    return config


def place(name: str, config: dict) -> Placement | None:
    """The placement of GGUF tensor ``name``; None for tensors we skip (the MTP block)."""
    match = _BLOCK.fullmatch(name)
    if match is None:
        part, _, leaf = name.rpartition(".")
        if part in TOP_LEVEL and leaf == "weight":
            return Placement(TOP_LEVEL[part])
        raise UnsupportedGGUF(f"tensor {name!r} has no counterpart in the Qwen3.5 model")
    layer, rest = int(match.group(1)), match.group(2)
    if layer >= config["num_hidden_layers"]:
        return None  # multi-token prediction: not used for generation
    prefix = f"model.layers.{layer}"
    if rest == "ssm_a":  # no ".weight": -exp(A_log), in tiled value-head order
        return Placement(f"{prefix}.linear_attn", "A_log", rows=_untile(config, 1),
                         transform=lambda a: np.log(-a.astype(np.float64)), force_float=True)
    if rest == "ssm_dt.bias":
        return Placement(f"{prefix}.linear_attn", "dt_bias", rows=_untile(config, 1),
                         force_float=True)
    if rest == "ffn_gate_up_exps.weight":
        return Placement(f"{prefix}.mlp.switch_mlp.gate_up_proj",
                         split=(f"{prefix}.mlp.switch_mlp.gate_proj",
                                f"{prefix}.mlp.switch_mlp.up_proj"))
    part, _, leaf = rest.rpartition(".")
    if part not in _PER_LAYER or leaf not in ("weight", "bias"):
        raise UnsupportedGGUF(f"tensor {name!r} has no counterpart in the Qwen3.5 model")
    module = f"{prefix}.{_PER_LAYER[part]}"
    placement = Placement(module, leaf)
    d_v, qk = config["linear_value_head_dim"], _qk_rows(config)
    if part == "attn_qkv":
        placement.rows = np.concatenate([np.arange(qk), qk + _untile(config, d_v)])
    elif part == "ssm_conv1d":
        placement.rows = np.concatenate([np.arange(qk), qk + _untile(config, d_v)])
        placement.force_float = True  # nn.Conv1d: [C, K] -> MLX's [C, K, 1]
        placement.transform = lambda w: w[:, :, None]
    elif part == "attn_gate":
        placement.rows = _untile(config, d_v)
    elif part in ("ssm_alpha", "ssm_beta"):
        placement.rows = _untile(config, 1)
    elif part == "ssm_out":
        placement.columns = _untile(config, d_v)
    elif part == "ffn_gate_inp_shexp":  # nn.Linear(hidden, 1): [1, hidden] whatever the file's
        placement.force_float = True
        placement.transform = lambda w: w.reshape(1, -1)
    elif part.endswith("norm"):
        placement.force_float = True
    return placement


def _qk_rows(config: dict) -> int:
    return 2 * config["linear_num_key_heads"] * config["linear_key_head_dim"]


def _untile(config: dict, head_dim: int) -> np.ndarray:
    """File rows of the value heads (``head_dim`` rows each) in Hugging Face's grouped order.

    The file holds head j * n_k + k at position p for value head j of key head k; grouped order
    wants it at k * r + j. Viewing positions as [j, k, d] and reading them as [k, j, d] lists
    them in grouped order."""
    n_v, n_k = config["linear_num_value_heads"], config["linear_num_key_heads"]
    order = np.arange(n_v * head_dim).reshape(n_v // n_k, n_k, head_dim)
    return order.transpose(1, 0, 2).reshape(-1)


