"""Qwen3-MoE: our model against mlx-lm's qwen3_moe on the same Hugging Face checkpoint (per-
expert weights, a dense `mlp_only_layers` layer in one variant), rows batched against alone,
and its GGUF form (``qwen3moe``) written as llama.cpp's converter writes it, loaded back.

The GGUF writer below performs the converter's steps (``Qwen3MoeModel`` -> ``Qwen2MoeModel``
-> ``TextModel``) in the converter's direction, independently of ``mlxserve.quant``: per-expert
tensors stacked into ``mlp.experts.{gate,up,down}_proj`` [experts, rows, cols], names through
gguf-py's TensorNameMap, F32 for 1-D tensors, norms and the router ``ffn_gate_inp``, the
caller's type for the other matrices.
"""

from __future__ import annotations

import json
import re

import gguf
import mlx.core as mx
import numpy as np
import pytest
from gguf import GGMLQuantizationType as T
from mlx.utils import tree_flatten
from mlx_lm.generate import generate_step
from mlx_lm.utils import load_model as mlx_lm_load_model
from safetensors.numpy import load_file, save_file
from tiny_models import add_tokenizer_metadata, prompt_logits

from mlxserve.engine import Engine, EngineConfig
from mlxserve.loader import load_model
from mlxserve.sampling import SamplingParams
from mlxserve.scheduler import Request

TEXT = ("The capital of France is Paris. Once upon a time there was a tiny model that "
        "generated text.")
GREEDY = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)


def load(spec):
    return load_model(str(spec), dtype=mx.float32, progress=False)




def generate(loaded, prompts, **cfg) -> list[list[int]]:
    with Engine(loaded, EngineConfig(**cfg)) as engine:
        streams = [engine.submit(Request(p, GREEDY)) for p in prompts]
        return [[t for event in stream for t in event.token_ids] for stream in streams]


def reference_greedy(folder, ids, n):
    model, _ = mlx_lm_load_model(folder)
    steps = generate_step(mx.array(ids), model, max_tokens=n, sampler=lambda x: mx.argmax(x, axis=-1))
    return [int(token) for token, _ in steps]


# --- the Hugging Face checkpoint against mlx-lm -------------------------------------------------

@pytest.fixture(scope="module", params=["qwen3_moe", "qwen3_moe_mixed"])
def moe(request, tiny_model_dir):
    folder = tiny_model_dir(request.param)
    return request.param, folder, load(folder)


def test_checkpoint_is_per_expert_and_layers_follow_config(moe):
    arch, folder, loaded = moe
    names = load_file(str(folder / "model.safetensors")).keys()
    assert "model.layers.1.mlp.experts.7.down_proj.weight" in names
    assert not any("switch_mlp" in n for n in names)
    kinds = [type(layer.mlp).__name__ for layer in loaded.model.layers]
    assert kinds == (["MLP", "SparseMoE"] if arch == "qwen3_moe_mixed" else ["SparseMoE"] * 2)
    gate = loaded.model.layers[1].mlp.switch_mlp.gate_proj.weight
    assert gate.shape == (8, 32, 64)
    stored = load_file(str(folder / "model.safetensors"))["model.layers.1.mlp.experts.5.gate_proj.weight"]
    np.testing.assert_array_equal(np.array(gate[5]), stored)


def test_logits_and_greedy_ids_match_mlx_lm(moe):
    _, folder, loaded = moe
    ids = loaded.tokenizer.encode(TEXT)
    ref_model, _ = mlx_lm_load_model(folder)
    expected = ref_model(mx.array(ids)[None])[0].astype(mx.float32)
    ours = prompt_logits(loaded, ids)
    assert expected.std().item() > 1  # margins large enough for greedy ids to mean something
    assert mx.abs(ours - expected).max().item() < 1e-4
    assert generate(loaded, [ids]) == [reference_greedy(folder, ids, 16)]


def test_batched_rows_equal_rows_alone(moe):
    _, _, loaded = moe
    tok = loaded.tokenizer
    prompts = [tok.encode(t) for t in (TEXT, "Hello world!", TEXT[:40], "def add(a, b):")]
    alone = [generate(loaded, [p])[0] for p in prompts]
    assert len({tuple(a) for a in alone}) > 1
    assert generate(loaded, prompts, block_size=16) == alone


def test_mlx_quantized_checkpoint_matches_mlx_lm(tiny_model_dir):
    """mlx-community's layout: experts stacked under switch_mlp, quantized (router too)."""
    folder = tiny_model_dir("qwen3_moe", "float32", 4)
    loaded = load(folder)
    sparse = loaded.model.layers[0].mlp
    assert type(sparse.switch_mlp.gate_proj).__name__ == "QuantizedSwitchLinear"
    assert sparse.switch_mlp.gate_proj.bits == 4
    ids = loaded.tokenizer.encode(TEXT)
    ref_model, _ = mlx_lm_load_model(folder)
    expected = ref_model(mx.array(ids)[None])[0].astype(mx.float32)
    assert mx.abs(prompt_logits(loaded, ids) - expected).max().item() < 1e-3
    assert generate(loaded, [ids]) == [reference_greedy(folder, ids, 16)]


def test_norm_topk_prob_changes_the_output(tmp_path, tiny_model_dir):
    """The renormalisation is applied (the tiny config sets it): without it logits differ."""
    folder = tiny_model_dir("qwen3_moe")
    config = json.loads((folder / "config.json").read_text())
    other = tmp_path / "no-norm"
    other.mkdir()
    for item in folder.iterdir():
        (other / item.name).write_bytes(item.read_bytes())
    (other / "config.json").write_text(json.dumps(dict(config, norm_topk_prob=False)))
    a, b = load(folder), load(other)
    ids = a.tokenizer.encode(TEXT)
    assert mx.abs(prompt_logits(a, ids) - prompt_logits(b, ids)).max().item() > 1e-2


# --- GGUF (llama.cpp's qwen3moe) ---------------------------------------------------------------

_FLOAT = (T.F32, T.F16, T.BF16)


def write_qwen3moe_gguf(folder, path, default: T = T.F32) -> dict[str, np.ndarray]:
    """Convert the checkpoint in ``folder`` as convert_hf_to_gguf.py does; returns the
    checkpoint's tensors (HF names) holding exactly the values the file holds."""
    config = json.loads((folder / "config.json").read_text())
    hf = {k: v.astype(np.float32) for k, v in load_file(str(folder / "model.safetensors")).items()}
    n_layers, n_experts = config["num_hidden_layers"], config["num_experts"]
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.QWEN3MOE, n_layers)
    writer = gguf.GGUFWriter(str(path), "qwen3moe")
    held: dict[str, np.ndarray] = {}

    converted: list[tuple[str, np.ndarray, list[str]]] = []  # (name, data, HF sources)
    for name, w in hf.items():
        match = re.fullmatch(r"(model\.layers\.\d+\.mlp\.experts)\.(\d+)\.(\w+)\.weight", name)
        if match is None:
            converted.append((name, w, [name]))
        elif match.group(2) == "0":  # Qwen2MoeModel: stack the experts once all are seen
            base, proj = match.group(1), match.group(3)
            sources = [f"{base}.{e}.{proj}.weight" for e in range(n_experts)]
            converted.append((f"{base}.{proj}.weight", np.stack([hf[s] for s in sources]), sources))
    for name, data, sources in converted:
        file_name = names.get_name(name, try_suffixes=(".weight", ".bias"))
        assert file_name is not None, name
        qtype = default
        if data.ndim <= 1 or file_name.endswith("_norm.weight") or ".ffn_gate_inp." in file_name:
            qtype = T.F32
        stored = data if qtype in _FLOAT else gguf.quants.quantize(data, qtype)
        writer.add_tensor(file_name, stored, raw_dtype=None if qtype in _FLOAT else qtype)
        values = data if qtype in _FLOAT else gguf.quants.dequantize(stored, qtype).reshape(data.shape)
        for i, source in enumerate(sources):
            held[source] = np.asarray(values[i] if len(sources) > 1 else values, np.float32)

    writer.add_block_count(n_layers)
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(config["num_attention_heads"])
    writer.add_head_count_kv(config["num_key_value_heads"])
    writer.add_rope_freq_base(config["rope_theta"])
    writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
    writer.add_expert_count(n_experts)
    writer.add_expert_used_count(config["num_experts_per_tok"])
    writer.add_expert_feed_forward_length(config["moe_intermediate_size"])
    writer.add_key_length(config["head_dim"])
    writer.add_value_length(config["head_dim"])
    writer.add_file_type(gguf.LlamaFileType.ALL_F32 if default == T.F32 else gguf.LlamaFileType.MOSTLY_Q8_0)
    add_tokenizer_metadata(writer, (folder / "tokenizer.json").read_text(), config["vocab_size"], pre="qwen2")
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return held


def reference_folder(folder, out, held):
    out.mkdir(parents=True, exist_ok=True)
    for item in folder.iterdir():
        if item.name != "model.safetensors":
            (out / item.name).write_bytes(item.read_bytes())
    save_file(held, str(out / "model.safetensors"), metadata={"format": "pt"})
    return out


@pytest.mark.parametrize("qtype", [T.F32, T.Q8_0, T.Q4_0])
def test_gguf_round_trip(tmp_path, tiny_model_dir, qtype):
    folder = tiny_model_dir("qwen3_moe")
    held = write_qwen3moe_gguf(folder, tmp_path / "m.gguf", qtype)
    hf = load(reference_folder(folder, tmp_path / "ref", held))
    ours = load(tmp_path / "m.gguf")

    sparse = ours.model.layers[0].mlp
    assert type(sparse).__name__ == "SparseMoE"
    assert (sparse.top_k, sparse.norm_topk_prob) == (2, True)
    assert ours.model.args.num_experts == 8 and ours.model.args.moe_intermediate_size == 32
    switch = sparse.switch_mlp.down_proj
    if qtype == T.F32:
        assert type(switch).__name__ == "SwitchLinear"
        ref_params = dict(tree_flatten(hf.model.parameters()))
        for name, value in tree_flatten(ours.model.parameters()):
            np.testing.assert_array_equal(np.array(value), np.array(ref_params[name]), err_msg=name)
    else:
        assert type(switch).__name__ == "QuantizedSwitchLinear"
        assert switch.bits == (8 if qtype == T.Q8_0 else 4) and switch.group_size == 32
        assert type(sparse.gate).__name__ == "Linear"  # the router stays F32

    ids = hf.tokenizer.encode(TEXT)
    assert ours.tokenizer.encode(TEXT) == ids
    reference = prompt_logits(hf, ids)
    assert reference.std().item() > 1
    assert mx.abs(prompt_logits(ours, ids) - reference).max().item() < 1e-4 * reference.std().item()
    assert generate(ours, [ids]) == generate(hf, [ids])


# --- half precision on MLX's CPU back-end -------------------------------------------------------

@pytest.mark.parametrize("arch,dtype", [("qwen3_moe", "bfloat16"), ("qwen3_5_moe", "float16")])
def test_half_precision_experts_compute_in_float32_on_the_cpu(tiny_model_dir, monkeypatch, caplog, arch,
                                                              dtype):
    """MLX's CPU gather_mm runs only float32 ("[GatherMM::eval] Currently only supports
    float32." when the engine started): there an unquantized MoE model in half precision is
    computed in float32, said once; asked for in half precision, it is refused in one line."""
    import logging

    from mlxserve import loader
    from mlxserve.loader import ModelLoadError

    monkeypatch.setattr(loader, "_on_cpu", lambda: True, raising=False)  # what this machine is, or a GPU's tests
    folder = tiny_model_dir(arch, dtype)
    with caplog.at_level(logging.WARNING, logger="mlxserve.loader"):
        loaded = load_model(str(folder), progress=False)
    assert [r.getMessage() for r in caplog.records] == [
        f"MLX's CPU back-end computes unquantized mixture-of-experts layers only in float32: "
        f"computing this {dtype} model in float32"]
    assert {v.dtype for _, v in tree_flatten(loaded.model.parameters())} == {mx.float32}
    assert loaded.quantization == "float32"
    ids = loaded.tokenizer.encode(TEXT)
    assert len(generate(loaded, [ids])[0]) == GREEDY.max_tokens
    with pytest.raises(ModelLoadError, match=f"only in float32, not {dtype}: use --dtype float32"):
        load_model(str(folder), dtype=getattr(mx, dtype), progress=False)
