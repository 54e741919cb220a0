"""Loading: the same weights as GGUF and as safetensors generate the same greedy ids through
our engine; errors are one clear line."""

import json

import gguf
import mlx.core as mx
import numpy as np
import pytest
from gguf import GGMLQuantizationType as T
from safetensors.numpy import load_file, save_file

from mlxserve.engine import Engine
from mlxserve.loader import ModelLoadError, load_model
from mlxserve.registry import ModelNotFound
from mlxserve.sampling import SamplingParams
from tiny_models import gguf_tokenizer_metadata, llama_cpp_permute, make_tiny_model, to_gguf_name, write_gguf

CYCLE = [T.Q8_0, T.Q4_0, T.Q4_1, T.F16]


def gguf_pair(tmp_path, arch, meta_changes: dict | None = None):
    """(gguf file, folder with the exactly dequantized weights in float32 safetensors);
    `meta_changes` replaces metadata of the file."""
    folder = make_tiny_model(tmp_path / "hf", arch, hidden_size=64)
    config = json.loads((folder / "config.json").read_text())
    weights = load_file(str(folder / "model.safetensors"))
    tensors, dequantized = {}, {}
    for i, (name, w) in enumerate(sorted(weights.items())):
        qtype = T.F32 if w.ndim == 1 else CYCLE[i % len(CYCLE)]
        stored = gguf.quants.quantize(w, qtype)
        dequantized[name] = gguf.quants.dequantize(stored, qtype).reshape(w.shape).astype(np.float32)
        heads = {"q_proj": config["num_attention_heads"], "k_proj": config["num_key_value_heads"]}
        proj = name.split(".")[-2]
        if arch == "llama" and proj in heads:
            stored = gguf.quants.quantize(llama_cpp_permute(w, heads[proj]), qtype)
        tensors[to_gguf_name(name)] = (stored, qtype)
    kv = {
        f"{arch}.block_count": config["num_hidden_layers"],
        f"{arch}.context_length": config["max_position_embeddings"],
        f"{arch}.embedding_length": config["hidden_size"],
        f"{arch}.feed_forward_length": config["intermediate_size"],
        f"{arch}.attention.head_count": config["num_attention_heads"],
        f"{arch}.attention.head_count_kv": config["num_key_value_heads"],
        f"{arch}.attention.layer_norm_rms_epsilon": config["rms_norm_eps"],
        f"{arch}.rope.freq_base": config["rope_theta"],
        f"{arch}.vocab_size": config["vocab_size"],
    }
    if config.get("head_dim"):
        kv[f"{arch}.attention.key_length"] = kv[f"{arch}.attention.value_length"] = config["head_dim"]
    meta = gguf_tokenizer_metadata((folder / "tokenizer.json").read_text())
    pad = config["vocab_size"] - len(meta["tokenizer.ggml.tokens"])
    meta["tokenizer.ggml.tokens"] += [f"[PAD{i}]" for i in range(pad)]
    meta["tokenizer.ggml.token_type"] += [5] * pad  # unused
    gguf_file = write_gguf(tmp_path / f"tiny-{arch}.gguf", arch, kv | meta | (meta_changes or {}), tensors)
    save_file(dequantized, str(folder / "model.safetensors"), metadata={"format": "mlx"})
    return gguf_file, folder


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_gguf_and_safetensors_forms_generate_the_same_ids(tmp_path, arch):
    gguf_file, folder = gguf_pair(tmp_path, arch)
    params = SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True)
    results = []
    for spec in (gguf_file, folder):
        loaded = load_model(str(spec), dtype=mx.float32, progress=False)
        prompt = loaded.tokenizer.encode("The capital of France is")
        with Engine(loaded) as engine:
            results.append((prompt, [t for e in engine.generate(prompt, params) for t in e.token_ids]))
    assert results[0] == results[1]
    gguf_model = load_model(str(gguf_file), progress=False)
    assert gguf_model.format == "gguf"
    assert gguf_model.quantization != "unknown"


def test_a_gguf_file_loads_whatever_its_name_ends_with(tmp_path):
    """A GGUF file is one by its content (registry.resolve checks that it starts as one): a
    file named Model.GGUF, or with no suffix at all, loads as a .gguf one does. It was
    refused as "not a model folder or .gguf file", and loaded through a symbolic link by
    a .gguf name."""
    import os

    gguf_file, _ = gguf_pair(tmp_path, "llama")
    for name in ("Tiny.GGUF", "tiny-model"):
        os.link(gguf_file, tmp_path / name)
        loaded = load_model(str(tmp_path / name), progress=False)
        assert loaded.format == "gguf"
        assert loaded.tokenizer.encode("hello") == load_model(str(gguf_file), progress=False).tokenizer.encode("hello")


def test_missing_and_broken_models_fail_in_one_line(tmp_path):
    with pytest.raises(ModelNotFound) as err:
        load_model(str(tmp_path / "nope"), progress=False)
    assert "\n" not in str(err.value)
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "config.json").write_text("{}")
    with pytest.raises((ModelLoadError, ModelNotFound)) as err:
        load_model(str(tmp_path / "empty"), progress=False)
    assert "\n" not in str(err.value)
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"not a gguf file at all")
    with pytest.raises((ModelLoadError, ModelNotFound)) as err:
        load_model(str(bad), progress=False)
    assert "\n" not in str(err.value)


def _broken_folder(folder, config: str | None, weights: bytes | None):
    """A working tiny model folder whose config.json and weights, where given, are replaced."""
    make_tiny_model(folder, "llama")
    if config is not None:
        (folder / "config.json").write_text(config)
    if weights is not None:
        (folder / "model.safetensors").write_bytes(weights)
    return folder


def test_declared_sizes_beyond_the_weights_fail_before_the_model_is_built(tmp_path):
    """A config declaring more layers than its weights hold is refused before a layer is built
    (a million of them ran out of memory first), and a size beyond MLX's integers is one line."""
    folder = make_tiny_model(tmp_path / "m", "llama")
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 1000}))
    with pytest.raises(ModelLoadError) as err:
        load_model(str(folder), progress=False)
    assert str(err.value) == f"{folder}/config.json: num_hidden_layers is 1000, but the weights hold 2 layers"
    (folder / "config.json").write_text(json.dumps({**config, "max_position_embeddings": -1}))
    with pytest.raises(ModelLoadError, match="max_position_embeddings must be a whole number >= 1, got -1"):
        load_model(str(folder), progress=False)
    (folder / "config.json").write_text(json.dumps({**config, "vocab_size": 2**31}))
    with pytest.raises(ModelLoadError) as err:
        load_model(str(folder), progress=False)
    assert str(err.value).startswith(f"{folder}/config.json does not fit model_type 'llama' (OverflowError: ")


def test_a_fifo_or_a_broken_link_is_named_not_waited_on(tmp_path, monkeypatch):
    """Reading a FIFO waits for a writer for ever; a link that leads nowhere is not a hub repo
    id that happens to look like its relative path."""
    import os
    import threading

    def unblock(fifo):  # should a reader wait on the FIFO after all: a writer, so that it fails, not hangs
        try:
            fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
            os.write(fd, b"x")
            os.close(fd)
        except OSError:  # no reader: nothing to unblock
            pass

    folder = make_tiny_model(tmp_path / "m", "llama")
    (folder / "model.safetensors").unlink()
    fifos = [tmp_path / "pipe.gguf", folder / "model.safetensors"]
    timers = [threading.Timer(30, unblock, [fifo]) for fifo in fifos]
    for fifo, timer in zip(fifos, timers):
        os.mkfifo(fifo)
        timer.start()
    try:
        with pytest.raises(ModelNotFound, match="pipe.gguf is not a regular file"):
            load_model(str(tmp_path / "pipe.gguf"), progress=False)
        with pytest.raises(ModelLoadError, match="model.safetensors: not a regular file"):
            load_model(str(folder), progress=False)
    finally:
        for timer in timers:
            timer.cancel()
    monkeypatch.chdir(tmp_path)
    (tmp_path / "org").mkdir()
    os.symlink("/nonexistent/model", tmp_path / "org" / "name")
    with pytest.raises(ModelNotFound, match="org/name is a symbolic link to /nonexistent/model, which does not exist"):
        load_model("org/name", progress=False)


@pytest.mark.parametrize("config,weights,message", [
    # mx.load's RuntimeError, a traceback
    (None, np.random.default_rng(0).integers(0, 256, 5000, np.uint8).tobytes(),
     "{folder}/model.safetensors: not a readable safetensors file (Invalid json header length)"),
    (None, b"", "{folder}/model.safetensors: not a readable safetensors file"),
    # ModelArgs.__init__() missing 5 required positional arguments: a TypeError traceback
    ('{"model_type": "llama"}', None,
     "{folder}/config.json lacks settings 'hidden_size', 'num_hidden_layers', 'intermediate_size', "
     "'num_attention_heads', 'vocab_size', which model_type 'llama' needs"),
    # 'list' object has no attribute 'get': an AttributeError traceback
    ("[1]", None, "{folder}/config.json: expected a JSON object of settings, not an array"),
    ('{"model_type": ', None, "{folder}/config.json: not valid JSON (Expecting value"),
])
def test_a_broken_model_folder_is_one_line_naming_the_file(tmp_path, capsys, config, weights, message):
    from mlxserve import cli

    folder = _broken_folder(tmp_path / "m", config, weights)
    expected = message.format(folder=folder)
    with pytest.raises(ModelLoadError) as err:
        load_model(str(folder), progress=False)
    assert str(err.value).startswith(expected) and "\n" not in str(err.value), str(err.value)
    assert cli.main(["run", "--model", str(folder), "hi"]) == 2
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"mlxserve: error: {expected}"), lines


@pytest.mark.parametrize("key,value,message", [
    ("num_hidden_layers", "2", "{folder}/config.json: num_hidden_layers must be a whole number >= 1, got '2'"),
    ("num_attention_heads", "4", "{folder}/config.json does not fit model_type 'llama' "
                                 "(TypeError: unsupported operand type(s) for //: 'int' and 'str')"),
    # an AttributeError deep in mlx-lm's RoPE set-up
    ("rope_scaling", "linear", '{folder}/config.json: rope_scaling must be an object of RoPE settings '
                               '(e.g. {{"rope_type": "linear", "factor": 2.0}}), got \'linear\''),
    # one no check foresaw: the loader's last resort, the exception's type and message
    ("quantization", 4, "cannot load {folder}: AttributeError: 'int' object has no attribute 'get'"),
])
def test_a_config_setting_of_the_wrong_type_is_one_line(tmp_path, key, value, message):
    folder = make_tiny_model(tmp_path / "m", "llama")
    config = json.loads((folder / "config.json").read_text())
    config[key] = value
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelLoadError) as err:
        load_model(str(folder), progress=False)
    assert str(err.value) == message.format(folder=folder)


@pytest.mark.parametrize("file,value", [
    ("config.json", lambda vocab: vocab + 5),
    ("config.json", lambda vocab: [2, -1]),
    ("generation_config.json", lambda vocab: [0, vocab]),
    ("generation_config.json", lambda vocab: -3),
], ids=["config-past", "config-negative", "generation-past", "generation-negative"])
def test_an_eos_token_id_outside_the_vocabulary_is_one_line_naming_it(tmp_path, capsys, file, value):
    """Out of range, config.json's was taken without a word and generation_config.json's ended no
    answer (and failed --format json when it started)."""
    from mlxserve import cli

    folder = make_tiny_model(tmp_path / "m", "llama")
    vocab = json.loads((folder / "config.json").read_text())["vocab_size"]
    settings = json.loads((folder / file).read_text())
    settings["eos_token_id"] = value(vocab)
    (folder / file).write_text(json.dumps(settings))
    bad = settings["eos_token_id"][-1] if isinstance(settings["eos_token_id"], list) else settings["eos_token_id"]
    expected = (f"{folder}/{file}: eos_token_id {bad} is not a token id of the model's vocabulary "
                f"({vocab} tokens: ids 0 to {vocab - 1})")
    with pytest.raises(ModelLoadError) as err:
        load_model(str(folder), progress=False)
    assert str(err.value) == expected
    assert cli.main(["run", "--model", str(folder), "hi"]) == 2
    assert capsys.readouterr().err.splitlines() == [f"mlxserve: error: {expected}"]


def test_a_gguf_special_token_id_outside_the_vocabulary_is_named(tmp_path):
    """tokens[eos_token_id] was an IndexError; a negative id took the last token."""
    from mlxserve.tokenizer import Tokenizer, TokenizerError

    gguf_file, folder = gguf_pair(tmp_path, "qwen3", {"tokenizer.ggml.eos_token_id": 2**20})
    vocab = json.loads((folder / "config.json").read_text())["vocab_size"]
    with pytest.raises(ModelLoadError) as err:
        load_model(str(gguf_file), progress=False)
    assert str(err.value) == (f"cannot load {gguf_file}: GGUF metadata tokenizer.ggml.eos_token_id {2**20} is not a "
                              f"token id of the model's vocabulary ({vocab} tokens: ids 0 to {vocab - 1})")
    metadata = gguf_tokenizer_metadata((folder / "tokenizer.json").read_text())
    metadata["tokenizer.ggml.bos_token_id"] = -1
    with pytest.raises(TokenizerError, match=r"tokenizer.ggml.bos_token_id -1 is not a token id"):
        Tokenizer.from_gguf_metadata(metadata)


@pytest.mark.parametrize("file_type", ["x", 1.5, True, [15]])
def test_a_gguf_file_type_of_the_wrong_type_is_not_shown_as_the_quantization(tmp_path, file_type):
    """general.file_type only labels the file: a string showed as "file_type x" in the load
    line; now the label is the tensor types, as for a file without the key."""
    plain, _ = gguf_pair(tmp_path / "plain", "qwen3")
    odd, _ = gguf_pair(tmp_path / "odd", "qwen3", {"general.file_type": file_type})
    expected = load_model(str(plain), progress=False).quantization
    assert "Q8_0" in expected
    assert load_model(str(odd), progress=False).quantization == expected


@pytest.mark.parametrize("changes,says", [
    # A traceback at the first chat ("Can't compile non template nodes", "unhashable type").
    ({"tokenizer.chat_template": 3}, "GGUF metadata tokenizer.chat_template must be a string (a Jinja template), "
                                     "got the number 3"),
    ({"tokenizer.chat_template": ["a", "b"]}, "GGUF metadata tokenizer.chat_template must be a string (a Jinja template), got a list"),
    # The tokenizers library's bare Exception: a traceback.
    ({"tokenizer.ggml.merges": ["zz qq"]}, "GGUF metadata tokenizer.ggml.merges[0] 'zz qq' makes or merges 'zz', "
                                           "which is not in tokenizer.ggml.tokens"),
    ({"tokenizer.ggml.merges": ["abc"]}, "GGUF metadata tokenizer.ggml.merges[0] 'abc' is not a merge (two tokens separated by a space)"),
    # "AttributeError: 'int' object has no attribute 'split'", "failed to extract enum PyVocab ..."
    ({"tokenizer.ggml.merges": [1, 2]}, "GGUF metadata tokenizer.ggml.merges must be an array of strings, "
                                        "got a list holding the number 1"),
    ({"tokenizer.ggml.tokens": list(range(448))}, "GGUF metadata tokenizer.ggml.tokens must be an array of strings, "
                                                  "got a list holding the number 0"),
    ({"tokenizer.ggml.eos_token_id": [1, 2]}, "GGUF metadata tokenizer.ggml.eos_token_id must be one token id, got a list"),
])
def test_gguf_tokenizer_metadata_of_the_wrong_type_is_named(tmp_path, changes, says):
    gguf_file, _ = gguf_pair(tmp_path, "qwen3", changes)
    with pytest.raises(ModelLoadError) as err:
        load_model(str(gguf_file), progress=False)
    assert str(err.value) == f"cannot load {gguf_file}: {says}"


def test_unsupported_architecture_is_named(tmp_path):
    folder = make_tiny_model(tmp_path / "m", "qwen3")
    config = json.loads((folder / "config.json").read_text())
    config["model_type"] = "gpt_bigcode"
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelLoadError, match="gpt_bigcode"):
        load_model(str(folder), progress=False)


def _qwen3_5_copy(tiny_model_dir, tmp_path, dtype="float32", **text_changes):
    """A copy of the tiny Hugging Face-layout Qwen3.5 folder, its text_config changed."""
    import shutil

    folder = shutil.copytree(tiny_model_dir("qwen3_5", dtype), tmp_path / "m")
    config = json.loads((folder / "config.json").read_text())
    for key, value in text_changes.items():
        if value is None:
            config["text_config"].pop(key, None)
        else:
            config["text_config"][key] = value
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def _rope(factor):
    return {"rope_type": "default", "rope_theta": 1e7, "partial_rotary_factor": factor}


@pytest.mark.parametrize("changes,needle", [
    ({"full_attention_interval": 0, "layer_types": None}, "full_attention_interval must be a whole number >= 1, got 0"),
    ({"full_attention_interval": 0}, "full_attention_interval must be a whole number >= 1, got 0"),
    ({"linear_num_key_heads": 0}, "linear_num_key_heads must be a whole number >= 1, got 0"),
    ({"num_hidden_layers": 0, "layer_types": []}, "num_hidden_layers must be a whole number >= 1, got 0"),
    ({"rope_parameters": _rope(0.0)}, "partial_rotary_factor 0.0 of head_dim 32 rotates 0 dims"),
    ({"rope_parameters": _rope(3 / 32)}, "rotates 3 dims per head: RoPE needs an even number"),
    ({"rope_parameters": "default"}, "config.json: text_config.rope_parameters must be an object of RoPE settings"),
])
def test_malformed_qwen3_5_config_is_one_line_naming_the_field(tiny_model_dir, tmp_path, changes, needle):
    """Each of these divided by zero, built a model without layers, or failed only when the
    engine started ("[rope] dims must be even")."""
    folder = _qwen3_5_copy(tiny_model_dir, tmp_path, **changes)
    with pytest.raises(ModelLoadError) as err:
        load_model(str(folder), progress=False)
    assert needle in str(err.value) and "\n" not in str(err.value)


def test_missing_and_unexpected_weights_are_named_on_one_line(tiny_model_dir, tmp_path, capsys):
    """MLX's own message puts the names on the lines after "Missing 1 parameters:", which the
    command line's one-line error cut off."""
    from mlxserve import cli

    folder = _qwen3_5_copy(tiny_model_dir, tmp_path)
    weights = mx.load(str(folder / "model.safetensors"))
    del weights["model.language_model.layers.1.self_attn.k_norm.weight"]
    weights["model.language_model.layers.0.extra.weight"] = mx.zeros(2)
    mx.save_safetensors(str(folder / "model.safetensors"), weights)
    assert cli.main(["run", "--model", str(folder), "hi"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert "1 parameter(s) missing from the weights: model.layers.1.self_attn.k_norm.weight" in err[0]
    assert "1 weight(s) the model has no parameter for: model.layers.0.extra.weight" in err[0]


def test_label_names_the_dtype_of_the_weights_used(tiny_model_dir):
    """A bfloat16 Qwen3.5 checkpoint whose vision and MTP weights (dropped) are float32."""
    folder = tiny_model_dir("qwen3_5", "bfloat16")
    dropped = mx.load(str(folder / "model.safetensors"))
    assert dropped["model.visual.patch_embed.proj.weight"].dtype == mx.float32
    assert load_model(str(folder), progress=False).quantization == "bfloat16"
    assert load_model(str(folder), dtype=mx.float32, progress=False).quantization == "float32"
