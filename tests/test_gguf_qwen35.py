"""Qwen3.5 GGUF files (qwen35, qwen35moe), laid out as llama.cpp's converter writes them, against
the same checkpoint loaded from its Hugging Face folder.

``gguf_qwen35_writer`` performs the converter's steps on a tiny random Hugging Face checkpoint
(tiny_models.py); mlxserve must undo them. An all-F32 file must give back the checkpoint's
parameters exactly (A_log to the file's own float32 rounding of exp(A_log)); a quantized file
must give the logits of a checkpoint holding exactly the file's values, in both GGUF modes; and
each layout fact, broken on its own in a file, must visibly change the model, so the round trip
above would catch a loader that got it wrong.
"""

from __future__ import annotations

import json

import gguf
import mlx.core as mx
import numpy as np
import pytest
from gguf import GGMLQuantizationType as T
from gguf_qwen35_writer import FAULTS, reference_folder, write_qwen35_gguf
from mlx.utils import tree_flatten
from safetensors.numpy import load_file, save_file
from tiny_models import prompt_logits

from mlxserve.engine import Engine, EngineConfig
from mlxserve.loader import load_model
from mlxserve.sampling import SamplingParams
from mlxserve.scheduler import Request

TEXT = ("The capital of France is Paris. Once upon a time there was a tiny model that "
        "generated text.")
GREEDY = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)
ARCHS = ["qwen3_5", "qwen3_5_v8", "qwen3_5_moe", "qwen3_5_moe_v8"]


def load(spec, mode: str = "exact"):
    return load_model(str(spec), dtype=mx.float32, progress=False, gguf_mode=mode)


def all_logits(loaded, ids) -> np.ndarray:
    """[len(ids), vocab] float32 logits from one forward pass over ``ids``."""
    return np.array(prompt_logits(loaded, ids))


def generate(loaded, prompts, **cfg) -> list[list[int]]:
    with Engine(loaded, EngineConfig(**cfg)) as engine:
        streams = [engine.submit(Request(p, GREEDY)) for p in prompts]
        return [[t for event in stream for t in event.token_ids] for stream in streams]


def parameters(loaded) -> dict[str, np.ndarray]:
    return {k: np.array(v) for k, v in tree_flatten(loaded.model.parameters())}


# --- an all-F32 file is the checkpoint itself --------------------------------------------------

@pytest.mark.parametrize("arch", ARCHS)
def test_f32_file_gives_back_the_checkpoint(tmp_path, tiny_model_dir, arch):
    folder = tiny_model_dir(arch)
    written = write_qwen35_gguf(folder, tmp_path / "f32.gguf")
    hf, ours = load(folder), load(written.path)
    exact = load(reference_folder(folder, tmp_path / "reference", written))  # A_log as in file

    # Trunk depth is block_count - nextn_predict_layers: the MTP block (blk.4) is not a layer.
    assert any(name.startswith("blk.4.") for name in written.types)
    assert ours.config["num_hidden_layers"] == 4
    assert [layer.is_linear for layer in ours.model.layers] == [True, False, True, False]
    text = json.loads((folder / "config.json").read_text())["text_config"]
    for key in ("linear_num_value_heads", "linear_num_key_heads", "linear_key_head_dim",
                "linear_value_head_dim", "linear_conv_kernel_dim", "head_dim", "hidden_size",
                "num_attention_heads", "num_key_value_heads", "vocab_size"):
        assert ours.config[key] == text[key], key
    assert ours.model.args.partial_rotary_factor == hf.model.args.partial_rotary_factor
    assert ours.model.args.rope_theta == hf.model.args.rope_theta
    assert ours.quantization == "F32"

    # Every parameter bit for bit, A_log aside: the file holds float32 -exp(A_log), so log of it
    # is A_log to within that rounding (one ulp, 2**-23 of exp(A_log): float32 exp is not always
    # correctly rounded) plus A_log's own float32 rounding (2**-24 * |A_log| in the same terms).
    ours_p, hf_p = parameters(ours), parameters(hf)
    assert ours_p.keys() == hf_p.keys()
    for name, value in hf_p.items():
        if name.endswith("A_log"):
            a, b = ours_p[name].astype(np.float64), value.astype(np.float64)
            assert np.all(np.abs(np.expm1(a - b)) <= 2.0**-23 * (1 + np.abs(b))), name
        else:
            assert np.array_equal(ours_p[name], value), name

    # The same model, so the same logits: exactly, given the file's A_log; within the random
    # tiny model's sensitivity to A_log's last bit otherwise.
    ids = hf.tokenizer.encode(TEXT)
    assert ours.tokenizer.encode(TEXT) == ids
    logits = all_logits(ours, ids)
    assert np.array_equal(logits, all_logits(exact, ids))
    reference = all_logits(hf, ids)
    assert reference.std() > 1  # logits that tell tokens apart
    np.testing.assert_allclose(logits, reference, atol=1e-3 * reference.std(), rtol=0)
    assert generate(ours, [ids]) == generate(hf, [ids])


# --- quantized files, exact and native-q4 -------------------------------------------------------

# GGUF tensor kind -> type; the rest Q8_0 (forced-F32 tensors stay F32). Rows of 256 values take
# K-quants: ssm_out and ffn_down in the v8 configurations.
PLANS = {
    "qwen3_5": {"token_embd": T.Q4_0, "attn_qkv": T.Q5_1, "attn_gate": T.Q4_1, "attn_q": T.F16,
                "ssm_alpha": T.Q5_0},
    "qwen3_5_v8": {"token_embd": T.Q4_0, "attn_qkv": T.Q5_1, "attn_gate": T.Q4_1,
                   "ssm_out": T.Q4_K, "ffn_down": T.Q5_K, "attn_q": T.F16, "ssm_beta": T.Q4_0},
    "qwen3_5_moe": {"token_embd": T.Q4_1, "attn_qkv": T.Q4_0, "ffn_gate_exps": T.Q4_0,
                    "ffn_up_exps": T.Q5_1, "ffn_down_exps": T.Q5_0, "ffn_up_shexp": T.F16},
    "qwen3_5_moe_v8": {"token_embd": T.Q8_0, "attn_gate": T.Q5_0, "ssm_out": T.Q4_K,
                       "ffn_gate_up_exps": T.Q4_1, "ffn_down_exps": T.Q8_0},
}


@pytest.fixture(scope="module")
def quantized(tmp_path_factory, tiny_model_dir):
    """arch -> (file, folder holding exactly the file's values, Written), made once."""
    made = {}

    def make(arch):
        if arch not in made:
            tmp = tmp_path_factory.mktemp(f"{arch}-q")
            folder = tiny_model_dir(arch)
            written = write_qwen35_gguf(folder, tmp / "q.gguf", PLANS[arch], default=T.Q8_0,
                                        fuse_gate_up=arch == "qwen3_5_moe_v8", seed=1)
            made[arch] = (written.path, reference_folder(folder, tmp / "reference", written),
                          written)
        return made[arch]

    return make


@pytest.mark.parametrize("arch", ARCHS)
def test_quantized_file_exact_mode(quantized, arch):
    path, ref_folder, _ = quantized(arch)
    ours, hf = load(path), load(ref_folder)

    layers = ours.model.layers
    assert type(ours.model.model.embed_tokens).__name__ == "QuantizedEmbedding"
    in_proj = layers[0].linear_attn.in_proj_qkv
    out_proj = layers[0].linear_attn.out_proj
    if arch.endswith("v8"):  # Q4_K: the column reorder moves whole groups of 32, codes kept
        assert (out_proj.bits, out_proj.group_size) == (4, 32)
    else:  # 16-wide value heads split Q8_0's groups of 32: float, exact values
        assert type(out_proj).__name__ == "Linear"
    assert in_proj.group_size == 32 and in_proj.bits in (4, 5, 8)
    assert type(layers[0].linear_attn.conv1d).__name__ == "Conv1d"

    ids = hf.tokenizer.encode(TEXT)
    reference = all_logits(hf, ids)
    assert reference.std() > 1
    np.testing.assert_allclose(all_logits(ours, ids), reference, atol=1e-4 * reference.std(),
                               rtol=0)
    assert generate(ours, [ids]) == generate(hf, [ids])


@pytest.mark.parametrize("arch", ["qwen3_5_v8", "qwen3_5_moe"])
def test_quantized_file_native_q4_mode(quantized, tmp_path, arch):
    """native-q4 re-quantizes the file's exact values in Hugging Face order (after the value-head
    reordering is undone): the reference re-quantizes the same values itself."""
    path, ref_folder, written = quantized(arch)
    ours = load(path, mode="native-q4")
    weights = load_file(str(ref_folder / "model.safetensors"))
    for name in written.reference:  # the trunk's tensors
        w = weights[name]
        if written.hf_types[name] - {T.F32, T.F16} and w.shape[-1] % 64 == 0:
            weights[name] = np.array(mx.dequantize(*mx.quantize(mx.array(w), group_size=64, bits=4),
                                                   group_size=64, bits=4))
    requantized = tmp_path / "requantized"
    requantized.mkdir()
    for item in ref_folder.iterdir():
        if item.name != "model.safetensors":
            (requantized / item.name).write_bytes(item.read_bytes())
    save_file(weights, str(requantized / "model.safetensors"), metadata={"format": "pt"})
    hf = load(requantized)

    out_proj = ours.model.layers[0].linear_attn.out_proj
    assert (out_proj.bits, out_proj.group_size) == (4, 64)
    ids = hf.tokenizer.encode(TEXT)
    reference = all_logits(hf, ids)
    np.testing.assert_allclose(all_logits(ours, ids), reference, atol=1e-4 * reference.std(),
                               rtol=0)
    assert generate(ours, [ids]) == generate(hf, [ids])


def test_quantized_moe_runs_batched_in_the_engine(quantized):
    """Rows batched together (chunked prefill, several decoding rows) give what each gives alone,
    and what the reference checkpoint gives."""
    path, ref_folder, _ = quantized("qwen3_5_moe_v8")
    ours, hf = load(path), load(ref_folder)
    tok = ours.tokenizer
    prompts = [tok.encode(t) for t in (TEXT, "Hello world!", TEXT[:40], "def add(a, b):")]
    together = generate(ours, prompts, block_size=16, max_batch_tokens=24)
    assert together == [generate(ours, [p], block_size=16)[0] for p in prompts]
    assert together == generate(hf, prompts, block_size=16, max_batch_tokens=24)


# --- the file layout, read back with gguf's own reader -------------------------------------------

def test_writer_lays_the_file_out_as_llama_cpp(tmp_path, tiny_model_dir):
    """The facts the loader relies on, as the test writer (the converter's steps) puts them in the
    file: read with gguf.GGUFReader, checked against the Hugging Face tensors."""
    folder = tiny_model_dir("qwen3_5_moe_v8")
    text = json.loads((folder / "config.json").read_text())["text_config"]
    hf = load_file(str(folder / "model.safetensors"))
    written = write_qwen35_gguf(folder, tmp_path / "m.gguf")
    reader = gguf.GGUFReader(str(written.path))
    field = lambda key: reader.fields[f"qwen35moe.{key}"].contents()
    tensors = {t.name: t for t in reader.tensors}
    value = lambda name: np.array(tensors[name].data)

    n_v, n_k, d_k, d_v = (text[k] for k in ("linear_num_value_heads", "linear_num_key_heads",
                                            "linear_key_head_dim", "linear_value_head_dim"))
    assert reader.fields["general.architecture"].contents() == "qwen35moe"
    assert (field("block_count"), field("nextn_predict_layers")) == (5, 1)
    assert (field("ssm.state_size"), field("ssm.group_count"), field("ssm.time_step_rank"),
            field("ssm.inner_size")) == (d_k, n_k, n_v, d_v * n_v)
    assert field("rope.dimension_count") == text["head_dim"] // 4
    assert field("rope.dimension_sections") == [2, 1, 1, 0]
    assert field("full_attention_interval") == 2

    p = "model.language_model.layers"
    # norms + 1, but not the gated one
    assert np.array_equal(value("blk.0.attn_norm.weight"), hf[f"{p}.0.input_layernorm.weight"] + 1)
    assert np.array_equal(value("blk.1.post_attention_norm.weight"),
                          hf[f"{p}.1.post_attention_layernorm.weight"] + 1)
    assert np.array_equal(value("blk.0.ssm_norm.weight"), hf[f"{p}.0.linear_attn.norm.weight"])
    # ssm_a = -exp(A_log), F32, no ".weight", value heads tiled: file j * n_k + k = HF k * r + j
    assert tensors["blk.0.ssm_a"].tensor_type == T.F32 and "blk.0.ssm_a.weight" not in tensors
    r = n_v // n_k
    grouped = np.array([k * r + j for j in range(r) for k in range(n_k)])
    a_log = hf[f"{p}.0.linear_attn.A_log"]
    assert np.array_equal(value("blk.0.ssm_a"), -np.exp(a_log)[grouped])
    assert not np.array_equal(grouped, np.argsort(grouped))  # not its own inverse here
    assert np.array_equal(value("blk.0.ssm_dt.bias"), hf[f"{p}.0.linear_attn.dt_bias"][grouped])
    # conv1d [C, 1, K] -> [C, K] (GGUF dims [K, C]), F32
    conv = tensors["blk.0.ssm_conv1d.weight"]
    assert conv.tensor_type == T.F32 and list(conv.shape) == [text["linear_conv_kernel_dim"],
                                                             2 * n_k * d_k + n_v * d_v]
    # experts and shared expert
    for name in ("ffn_gate_exps", "ffn_up_exps", "ffn_down_exps", "ffn_gate_inp",
                 "ffn_gate_shexp", "ffn_up_shexp", "ffn_down_shexp", "ffn_gate_inp_shexp"):
        assert f"blk.0.{name}.weight" in tensors, name
    assert tensors["blk.0.ffn_gate_inp.weight"].tensor_type == T.F32
    # the MTP block
    assert {"blk.4.nextn.eh_proj.weight", "blk.4.nextn.enorm.weight", "blk.4.attn_q.weight",
            "blk.4.ffn_gate_exps.weight"} <= tensors.keys()


# --- each fact matters --------------------------------------------------------------------------

@pytest.mark.parametrize("fault", FAULTS)
def test_each_layout_fact_changes_the_model(tmp_path, tiny_model_dir, fault):
    """A file wrong in just one of the converter's steps loads to a visibly different model, so
    the exact round trip above fails for a loader that mishandles that step (skipping it,
    doing it twice or backwards)."""
    folder = tiny_model_dir("qwen3_5_v8")
    hf = load(folder)
    ids = hf.tokenizer.encode(TEXT)
    reference = all_logits(hf, ids)
    broken = write_qwen35_gguf(folder, tmp_path / f"{fault}.gguf", faults=(fault,))
    with np.errstate(invalid="ignore"):  # log(-A_log) of a positive A_log is not a number
        got = all_logits(load(broken.path), ids)
    assert not np.allclose(got, reference, atol=1e-3 * reference.std(), rtol=0)


def test_yarn_rope_scaling_carries_over(tmp_path, tiny_model_dir):
    """A checkpoint with YaRN RoPE (the converter writes rope.scaling.*) runs the same RoPE."""
    folder = tmp_path / "yarn"
    folder.mkdir()
    for item in tiny_model_dir("qwen3_5").iterdir():
        (folder / item.name).write_bytes(item.read_bytes())
    config = json.loads((folder / "config.json").read_text())
    config["text_config"]["rope_parameters"].update(
        rope_type="yarn", factor=4.0, original_max_position_embeddings=512)
    (folder / "config.json").write_text(json.dumps(config))
    written = write_qwen35_gguf(folder, tmp_path / "yarn.gguf")
    ours = load(written.path)
    hf = load(reference_folder(folder, tmp_path / "reference", written))

    rope, expected = ours.model.layers[1].self_attn.rope, hf.model.layers[1].self_attn.rope
    assert type(rope).__name__ == type(expected).__name__ == "YarnRoPE"
    assert np.array_equal(np.array(rope._freqs), np.array(expected._freqs))
    assert rope.mscale == expected.mscale != 1
    ids = hf.tokenizer.encode(TEXT * 3)
    assert np.array_equal(all_logits(ours, ids), all_logits(hf, ids))


# --- malformed metadata ------------------------------------------------------------------------

@pytest.mark.parametrize("key,value,needle", [
    ("full_attention_interval", 0, "qwen35.full_attention_interval must be a whole number >= 1, got 0"),
    ("ssm.group_count", 0, "qwen35.ssm.group_count must be a whole number >= 1, got 0"),
    ("ssm.time_step_rank", 0, "qwen35.ssm.time_step_rank must be a whole number >= 1, got 0"),
    ("rope.dimension_count", 0, "qwen35.rope.dimension_count must be a whole number >= 2, got 0"),
    ("rope.dimension_count", 3, "qwen35.rope.dimension_count (3) must be an even number of dims up to "
                                "the head size (32)"),
    ("rope.dimension_count", 64, "qwen35.rope.dimension_count (64) must be an even number"),
    ("nextn_predict_layers", 5, "qwen35.nextn_predict_layers (5) leaves no layers of qwen35.block_count (5)"),
])
def test_malformed_metadata_is_one_line_naming_the_key(tmp_path, tiny_model_dir, monkeypatch, key, value,
                                                       needle):
    """Each of these divided by zero, made a model without layers, or failed only when the
    engine started ("[rope] dims must be even")."""
    import gguf_qwen35_writer

    from mlxserve.loader import ModelLoadError

    written_metadata = gguf_qwen35_writer._metadata

    def metadata(writer, *args, **kwargs):
        written_metadata(writer, *args, **kwargs)
        writer.add_uint32(f"qwen35.{key}", value)  # overwrites the key's value

    monkeypatch.setattr(gguf_qwen35_writer, "_metadata", metadata)
    written = write_qwen35_gguf(tiny_model_dir("qwen3_5"), tmp_path / "bad.gguf")
    with pytest.raises(ModelLoadError) as err:
        load(written.path)
    assert needle in str(err.value) and "\n" not in str(err.value)
