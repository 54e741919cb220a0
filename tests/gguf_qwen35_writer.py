"""Write a tiny Hugging Face-layout Qwen3.5 checkpoint as a GGUF file, the way llama.cpp's
converter (convert_hf_to_gguf.py; conversion/qwen.py in later versions) writes it.

This module only performs the converter's steps, in the converter's own direction, and is
written independently of ``mlxserve.quant`` (which undoes them), so that a mistake shared by
the two cannot hide. Per tensor, in the converter's order (``_Qwen35MtpMixin`` ->
``_LinearAttentionVReorderBase`` -> ``Qwen3NextModel`` -> ``Qwen2MoeModel`` -> ``ModelBase``):

1. ``model.language_model.`` -> ``model.``; vision tensors dropped; ``mtp.layers.i.*`` ->
   ``model.layers.{n + i}.*`` and ``mtp.fc`` / ``pre_fc_norm_embedding`` / ``pre_fc_norm_hidden``
   / ``norm`` -> ``blk.{n}.nextn.eh_proj`` / ``enorm`` / ``hnorm`` / ``shared_head_norm``.
2. More value heads than key heads: value heads from grouped order (k * r + j) to tiled
   (j * n_k + k) in in_proj_qkv's V rows, in_proj_z, in_proj_a/b, A_log, dt_bias, conv1d's V
   channels and out_proj's columns.
3. A_log -> -exp(A_log) (name kept: ``blk.i.ssm_a``, no ``.weight``); dt_bias ->
   ``dt_proj.bias``; conv1d squeezed to [C, K]; every ``norm.weight`` except
   ``linear_attn.norm.weight`` + 1.
4. Experts ``gate_up_proj`` [E, 2F, H] split in gate and up; ``down_proj`` gets ``.weight``.
5. Names through gguf-py's own TensorNameMap; with ``fuse_gate_up`` (``--fuse-gate-up-exps``)
   gate and up experts concatenated again as ``ffn_gate_up_exps``.
6. Types as ``prepare_tensors`` picks them: F32 for 1-D tensors, ``*_norm.weight``,
   ``ffn_gate_inp``, ``ffn_gate_inp_shexp``, ``ssm_conv1d`` and names not ending ``.weight``;
   the rest as the caller's plan says (what ``--outtype`` or llama-quantize would choose).

``faults`` makes the file wrong in one named way, for tests that show each step matters.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import gguf
import gguf_blocks_writer as blocks
import numpy as np
from gguf import GGMLQuantizationType as T
from safetensors.numpy import load_file, save_file
from tiny_models import add_tokenizer_metadata

FAULTS = (
    "no_plus_one",  # zero-centred norms stored as w, not 1 + w
    "plus_one_on_ssm_norm",  # the gated norm given + 1 too
    "a_log_as_is",  # ssm_a holding A_log instead of -exp(A_log)
    "no_v_reorder",  # value heads left in grouped order
    "v_reorder_backwards",  # the inverse permutation applied instead of the converter's
    "q_gate_split",  # attn_q as [all query heads; all gate heads] instead of per head
)
_FLOAT = (T.F32, T.F16, T.BF16)
_NEXTN = {"mtp.fc": "eh_proj", "mtp.pre_fc_norm_embedding": "enorm",
          "mtp.pre_fc_norm_hidden": "hnorm", "mtp.norm": "shared_head.norm"}
_NEXTN_GGUF = {"eh_proj": gguf.MODEL_TENSOR.NEXTN_EH_PROJ, "enorm": gguf.MODEL_TENSOR.NEXTN_ENORM,
               "hnorm": gguf.MODEL_TENSOR.NEXTN_HNORM,
               "shared_head.norm": gguf.MODEL_TENSOR.NEXTN_SHARED_HEAD_NORM}
# log10 of the K-quant super-block scales: values of roughly 0.1
LOG10_D = {T.Q4_K: (-4.3, -3.8), T.Q5_K: (-4.6, -4.1), T.Q6_K: (-4.3, -3.8), T.Q3_K: (-2.8, -2.3)}


@dataclass
class Written:
    path: Path
    text_config: dict
    types: dict[str, T]  # GGUF tensor name -> type
    hf_types: dict[str, set]  # HF name -> types of the file tensors made from it
    # HF name -> HF-layout values of what the file holds (A_log: log of minus the file's
    # ssm_a, the one A_log whose -exp is the file's value to float32 precision); empty for a
    # file written with faults
    reference: dict[str, np.ndarray]


def write_qwen35_gguf(folder: Path, path: Path, plan: dict[str, T] | None = None,
                      default: T = T.F32, *, mtp_layers: int = 1, fuse_gate_up: bool = False,
                      faults: tuple[str, ...] = (), seed: int = 0) -> Written:
    """Convert the checkpoint in ``folder`` into ``path``.

    ``plan``: GGUF tensor kind (``"ssm_out"``, ``"token_embd"``, ...) -> type, ``default`` for
    the rest (forced-F32 tensors stay F32). K-quant blocks cannot be computed from values by
    the gguf package, so K-quant tensors get random blocks (``gguf_blocks_writer``) and
    ``reference`` then holds those blocks' values. ``mtp_layers``: a random multi-token-
    prediction block to append (Qwen3.5 checkpoints carry one), as the converter writes it.
    """
    assert set(faults) <= set(FAULTS), faults
    rng = np.random.default_rng(seed)
    config = json.loads((folder / "config.json").read_text())
    text = dict(config["text_config"], tie_word_embeddings=config["tie_word_embeddings"])
    hf = {k: v.astype(np.float32) for k, v in load_file(str(folder / "model.safetensors")).items()}
    hf = {k: v for k, v in hf.items() if not k.startswith("mtp.")}  # a placeholder: made below
    if mtp_layers:
        hf.update(_mtp_block(hf, text, rng, mtp_layers))
        text["mtp_num_hidden_layers"] = mtp_layers
    arch = "qwen35moe" if text.get("num_experts") else "qwen35"
    n_trunk = text["num_hidden_layers"]
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.QWEN35MOE if arch == "qwen35moe"
                                     else gguf.MODEL_ARCH.QWEN35, n_trunk + mtp_layers)

    writer = gguf.GGUFWriter(str(path), arch)
    types: dict[str, T] = {}
    hf_types: dict[str, set] = {}
    reference: dict[str, np.ndarray] = {}
    for hf_name, w in hf.items():
        outputs = _convert(hf_name, w, text, names, fuse_gate_up, faults, values=True)
        index = _convert(hf_name, np.arange(w.size, dtype=np.float64).reshape(w.shape), text,
                         names, fuse_gate_up, (), values=False)
        ref = np.array(w, dtype=np.float32)
        for (name, data), (_, positions) in zip(outputs, index):
            qtype = _file_type(name, data, plan or {}, default)
            stored, held = _encode(data, qtype, rng)
            writer.add_tensor(name, stored, raw_dtype=None if qtype in _FLOAT else qtype)
            types[name] = qtype
            hf_types.setdefault(hf_name, set()).add(qtype)
            if faults:
                continue
            if _adds_one(hf_name):  # F32: the checkpoint's w is what gives the file's 1 + w
                assert qtype == T.F32, (name, qtype)
                continue
            if hf_name.endswith(".A_log"):  # the A_log the file's -exp(A_log) stands for
                assert qtype == T.F32, (name, qtype)
                held = np.log(-held.astype(np.float64)).astype(np.float32)
            # a rearrangement: put the file's values back where they came from
            ref.reshape(-1)[positions.astype(np.int64).reshape(-1)] = held.reshape(-1)
        if outputs and not hf_name.startswith("mtp.") and not faults:
            reference[hf_name] = ref
    _metadata(writer, text, folder, mtp_layers, default)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return Written(path, text, types, hf_types, reference)


def reference_folder(folder: Path, out: Path, written: Written) -> Path:
    """A copy of the checkpoint whose weights hold exactly what the file holds (K-quant blocks,
    rounded types, A_log), in Hugging Face layout."""
    out.mkdir(parents=True, exist_ok=True)
    for item in folder.iterdir():
        if item.name != "model.safetensors":
            (out / item.name).write_bytes(item.read_bytes())
    weights = load_file(str(folder / "model.safetensors"))
    weights.update({k: v.astype(np.float32) for k, v in written.reference.items()})
    save_file(weights, str(out / "model.safetensors"), metadata={"format": "pt"})
    return out


# --- the converter's steps -------------------------------------------------------------------

def _convert(name: str, w: np.ndarray, text: dict, names, fuse_gate_up: bool,
             faults: tuple[str, ...], values: bool) -> list[tuple[str, np.ndarray]]:
    """One HF tensor -> [(GGUF name, array)], as the converter yields them. ``values=False``
    runs only the rearrangements (for index arrays)."""
    if name.startswith(("model.visual.", "visual.")):
        return []
    name = name.replace("model.language_model.", "model.", 1)
    n = text["num_hidden_layers"]
    if name.startswith("mtp."):
        match = re.fullmatch(r"mtp\.layers\.(\d+)\.(.+)", name)
        if match:
            name = f"model.layers.{n + int(match.group(1))}.{match.group(2)}"
        else:  # one copy per MTP block
            stem, _, suffix = name.rpartition(".")
            out = []
            for b in range(n, n + text.get("mtp_num_hidden_layers", 0)):
                out += _convert(f"model.layers.{b}.{_NEXTN[stem]}.{suffix}", w, text, names,
                                fuse_gate_up, faults, values)
            return out

    w = _reorder_value_heads(name, w, text, faults)
    if name.endswith(".A_log"):
        if values and "a_log_as_is" not in faults:
            w = -np.exp(w)
    elif name.endswith(".dt_bias"):
        name = name[: -len(".dt_bias")] + ".dt_proj.bias"
    elif "conv1d" in name:
        w = w.squeeze()
    elif (name.endswith("norm.weight") and not name.endswith("linear_attn.norm.weight")
          and values and "no_plus_one" not in faults):
        w = w + 1
    if name.endswith("linear_attn.norm.weight") and values and "plus_one_on_ssm_norm" in faults:
        w = w + 1
    if name.endswith("self_attn.q_proj.weight") and "q_gate_split" in faults:
        heads, d = text["num_attention_heads"], text["head_dim"]
        w = w.reshape(heads, 2, d, -1).transpose(1, 0, 2, 3).reshape(w.shape)

    if name.endswith("mlp.experts.gate_up_proj"):
        f = w.shape[-2] // 2
        base = name[: -len(".gate_up_proj")]
        parts = [(f"{base}.gate_proj.weight", w[..., :f, :]),
                 (f"{base}.up_proj.weight", w[..., f:, :])]
    elif name.endswith("mlp.experts.down_proj"):
        parts = [(name + ".weight", w)]
    else:
        parts = [(name, w)]

    out = [(_gguf_name(part, names), data) for part, data in parts]
    if fuse_gate_up and len(out) == 2 and out[0][0].endswith("ffn_gate_exps.weight"):
        fused = out[0][0].replace("ffn_gate_exps", "ffn_gate_up_exps")
        out = [(fused, np.concatenate([out[0][1], out[1][1]], axis=1))]
    return out


def _reorder_value_heads(name: str, w: np.ndarray, text: dict, faults) -> np.ndarray:
    """Grouped -> tiled value-head order (``_LinearAttentionVReorderBase``)."""
    n_k, n_v = text["linear_num_key_heads"], text["linear_num_value_heads"]
    if n_k == n_v or "linear_attn." not in name or "no_v_reorder" in faults:
        return w
    d_k, d_v = text["linear_key_head_dim"], text["linear_value_head_dim"]
    qk = 2 * n_k * d_k

    def tile(x: np.ndarray, axis: int, head_dim: int) -> np.ndarray:
        x = np.moveaxis(x, axis, 0)
        rest = x.shape[1:]
        if "v_reorder_backwards" in faults:  # tiled -> grouped: the loader's direction
            x = x.reshape(n_v // n_k, n_k, head_dim, *rest).swapaxes(0, 1)
        else:
            x = x.reshape(n_k, n_v // n_k, head_dim, *rest).swapaxes(0, 1)
        return np.moveaxis(x.reshape(-1, *rest), 0, axis)

    if ".in_proj_qkv." in name:
        return np.concatenate([w[:qk], tile(w[qk:], 0, d_v)])
    if ".in_proj_z." in name:
        return tile(w, 0, d_v)
    if ".in_proj_a." in name or ".in_proj_b." in name or name.endswith((".A_log", ".dt_bias")):
        return tile(w, 0, 1)
    if ".conv1d." in name:
        squeezed = w.squeeze()
        return np.concatenate([squeezed[:qk], tile(squeezed[qk:], 0, d_v)])
    if ".out_proj." in name:
        return tile(w, 1, d_v)
    return w


def _adds_one(hf_name: str) -> bool:
    return hf_name.endswith("norm.weight") and not hf_name.endswith("linear_attn.norm.weight")


def _gguf_name(name: str, names) -> str:
    match = re.fullmatch(r"model\.layers\.(\d+)\.(eh_proj|enorm|hnorm|shared_head\.norm)\.(\w+)",
                         name)
    if match:  # the MTP block's own tensors
        bid, part, suffix = match.groups()
        return gguf.TENSOR_NAMES[_NEXTN_GGUF[part]].format(bid=bid) + "." + suffix
    mapped = names.get_name(name, try_suffixes=(".weight", ".bias"))
    assert mapped is not None, f"the converter cannot map {name}"
    return mapped


def _file_type(name: str, data: np.ndarray, plan: dict[str, T], default: T) -> T:
    kind = re.sub(r"^blk\.\d+\.", "", name)  # "ssm_out.weight", "ssm_a", "token_embd.weight"
    if kind.endswith((".weight", ".bias")):
        kind = kind.rsplit(".", 1)[0]
    if data.ndim <= 1 or name.endswith("_norm.weight"):
        return T.F32
    if kind in ("ffn_gate_inp", "ffn_gate_inp_shexp", "ssm_conv1d") or not name.endswith(".weight"):
        return T.F32
    return plan.get(kind, default)


def _encode(data: np.ndarray, qtype: T, rng) -> tuple[np.ndarray, np.ndarray]:
    """(what the writer stores, the float32 values the file then holds)."""
    if qtype in blocks.WRITERS:  # random blocks of the right size
        rows = int(np.prod(data.shape[:-1]))
        assert data.shape[-1] % 256 == 0, f"{qtype.name} needs rows of 256s, not {data.shape}"
        fields = blocks.WRITERS[qtype](rng, rows * data.shape[-1] // 256, log10_d=LOG10_D[qtype])
        stored = fields.blocks.reshape(*data.shape[:-1], -1)
    else:
        stored = gguf.quants.quantize(data.astype(np.float32), qtype)
    held = gguf.quants.dequantize(stored, qtype).reshape(data.shape).astype(np.float32)
    return stored, held


def _mtp_block(hf: dict, text: dict, rng, count: int) -> dict[str, np.ndarray]:
    """Random MTP weights shaped as Qwen3.5's: a full-attention decoder layer (same shapes as
    the trunk's last full-attention layer), the fc joining embedding and hidden state, and
    three norms."""
    full = max(i for i, t in enumerate(text["layer_types"]) if t == "full_attention")
    prefix = f"model.language_model.layers.{full}."
    hidden = text["hidden_size"]
    out = {}
    for i in range(count):
        for name, w in hf.items():
            if name.startswith(prefix):
                out[f"mtp.layers.{i}.{name[len(prefix):]}"] = (
                    0.1 * rng.standard_normal(w.shape)).astype(np.float32)
    out["mtp.fc.weight"] = (0.1 * rng.standard_normal((hidden, 2 * hidden))).astype(np.float32)
    for norm in ("pre_fc_norm_embedding", "pre_fc_norm_hidden", "norm"):
        out[f"mtp.{norm}.weight"] = (0.1 * rng.standard_normal(hidden)).astype(np.float32)
    return out


def _metadata(writer: gguf.GGUFWriter, text: dict, folder: Path, mtp_layers: int,
              default: T) -> None:
    """The keys TextModel, Qwen2MoeModel, Qwen3NextModel and the Qwen3.5 mixins write."""
    rope = dict(text.get("rope_parameters") or {})
    head_dim = text["head_dim"]
    writer.add_block_count(text["num_hidden_layers"] + mtp_layers)
    writer.add_context_length(text["max_position_embeddings"])
    writer.add_embedding_length(text["hidden_size"])
    if text.get("intermediate_size"):
        writer.add_feed_forward_length(text["intermediate_size"])
    writer.add_head_count(text["num_attention_heads"])
    writer.add_head_count_kv(text["num_key_value_heads"])
    sections = list(rope.get("mrope_section", [11, 11, 10]))
    writer.add_rope_dimension_sections((sections + [0, 0, 0, 0])[:4])
    writer.add_rope_freq_base(rope.get("rope_theta", text.get("rope_theta")))
    if rope.get("rope_type") == "yarn" and "factor" in rope:
        writer.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        writer.add_rope_scaling_factor(rope["factor"])
        writer.add_rope_scaling_orig_ctx_len(rope["original_max_position_embeddings"])
    writer.add_layer_norm_rms_eps(text["rms_norm_eps"])
    if text.get("num_experts"):
        writer.add_expert_count(text["num_experts"])
        writer.add_expert_used_count(text["num_experts_per_tok"])
        writer.add_expert_feed_forward_length(text["moe_intermediate_size"])
        writer.add_expert_shared_feed_forward_length(text["shared_expert_intermediate_size"])
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_file_type({T.F32: gguf.LlamaFileType.ALL_F32, T.F16: gguf.LlamaFileType.MOSTLY_F16,
                          T.Q8_0: gguf.LlamaFileType.MOSTLY_Q8_0}.get(
                              default, gguf.LlamaFileType.GUESSED))
    writer.add_ssm_conv_kernel(text["linear_conv_kernel_dim"])
    writer.add_ssm_state_size(text["linear_key_head_dim"])
    writer.add_ssm_group_count(text["linear_num_key_heads"])
    writer.add_ssm_time_step_rank(text["linear_num_value_heads"])
    writer.add_ssm_inner_size(text["linear_value_head_dim"] * text["linear_num_value_heads"])
    writer.add_full_attention_interval(text.get("full_attention_interval", 4))
    partial = text.get("partial_rotary_factor", rope.get("partial_rotary_factor", 0.25))
    writer.add_rope_dimension_count(int(head_dim * partial))
    if mtp_layers:
        writer.add_nextn_predict_layers(mtp_layers)

    add_tokenizer_metadata(writer, (folder / "tokenizer.json").read_text(), text["vocab_size"])
