"""`mlxserve bench --random-weights SHAPE --random-gguf Q4_K_M`: random GGUF blocks in llama.cpp's
Q4_K_M mix, converted by the real GGUF path in exact and native-q4 mode."""

import json

import mlx.core as mx
import numpy as np
import pytest
from gguf import GGMLQuantizationType as T
from gguf.quants import dequantize
from mlx_lm.generate import generate_step

from mlxserve import bench, cli
from mlxserve.bench import CLOSED_LOOP_FIGURES
from mlxserve.engine import Engine
from mlxserve.quant.gguf import _hf_name, gguf_weights
from mlxserve.random_gguf import (
    build_random_gguf_model,
    gguf_shapes,
    gguf_metadata,
    q4_k_m_type,
    random_gguf_tensors,
    use_more_bits,
)
from mlxserve.random_weights import EMBEDDING_SCALE, shape_config
from mlxserve.sampling import SamplingParams
from tiny_models import float32_rope

SHAPE = "tiny-256"  # every matrix dimension a multiple of 256: real K-quants


def more_bits_layers(n: int) -> set[int]:
    """llama.cpp's use_more_bits, spelled out: the first and last eighth, and every third
    layer in between starting two after the first eighth."""
    first, last = n // 8, 7 * n // 8
    return set(range(first)) | set(range(last, n)) | set(range(first + 2, last, 3))


@pytest.mark.parametrize("n", [4, 8, 28, 36])
def test_use_more_bits_is_llama_cpps_rule(n):
    assert {i for i in range(n) if use_more_bits(i, n)} == more_bits_layers(n)


def test_tensor_types_follow_q4_k_m():
    config = shape_config(SHAPE)
    n = config["num_hidden_layers"]
    types = {t.name: t.tensor_type for t in random_gguf_tensors(config, seed=1)}
    six = more_bits_layers(n)
    assert six and six != set(range(n))  # the mix is visible at this depth
    for name, kind in types.items():
        if name.endswith("norm.weight"):
            assert kind == T.F32, name
        elif name == "token_embd.weight":  # tied embeddings take the output's Q6_K
            assert kind == T.Q6_K
        elif name.endswith((".attn_v.weight", ".ffn_down.weight")):
            assert kind == (T.Q6_K if int(name.split(".")[1]) in six else T.Q4_K), name
        else:
            assert kind == T.Q4_K, name
    assert "output.weight" not in types
    # Untied: the output is Q6_K and the embedding keeps the default Q4_K.
    assert q4_k_m_type("output.weight", 256, n, tied=False) == T.Q6_K
    assert q4_k_m_type("token_embd.weight", 256, n, tied=False) == T.Q4_K


def test_rows_not_a_multiple_of_256_fall_back_as_llama_cpp_does():
    config = shape_config("tiny")  # hidden 64
    types = {t.name: t.tensor_type for t in random_gguf_tensors(config)}
    assert types["token_embd.weight"] == T.Q8_0
    quantized = {k: v for k, v in types.items() if v != T.F32 and k != "token_embd.weight"}
    n = config["num_hidden_layers"]
    assert {v for k, v in quantized.items() if k.endswith(".ffn_down.weight")} == \
        {T.Q8_0 if i in more_bits_layers(n) else T.Q5_0 for i in range(n)}
    assert {v for k, v in quantized.items() if k.endswith(".attn_q.weight")} == {T.Q5_0}
    assert np.isfinite(logits(build_random_gguf_model("tiny", dtype="float32"), [1, 2, 3])).all()


def logits(loaded, prompt) -> np.ndarray:
    """Logits at every position, from mlx-lm's model on our converted arrays (as bench's
    --compare mlx-lm builds it)."""
    out = bench.mlx_lm_model(loaded)(mx.array([prompt]))
    return np.array(out[0].astype(mx.float32))


def test_exact_mode_holds_gguf_values():
    """Every converted tensor dequantizes to `gguf.quants.dequantize` of the very blocks: bit for
    bit with float32 scales (Q4_K, Q8_0, Q5_0), Q6_K within half the 8-bit step of its group
    (requant.py), and the values have the spread random_weights gives a float model."""
    config = shape_config(SHAPE)
    tensors = random_gguf_tensors(config, seed=2)
    w = gguf_weights(gguf_metadata(config, "Q4_K_M"), tensors, mx.float32, "exact")
    assert w.config["hidden_size"] == config["hidden_size"]
    seen = set()
    for t in tensors:
        if t.tensor_type == T.F32:
            continue
        module = _hf_name(t.name)[0]  # gguf.py's own name map
        assert w.tensor_types[f"{module}.weight"] == t.tensor_type.name
        q = w.quantization[module]
        ours = np.array(mx.dequantize(w.weights[f"{module}.weight"], w.weights[f"{module}.scales"],
                                      w.weights[f"{module}.biases"], group_size=q["group_size"], bits=q["bits"]))
        reference = dequantize(t.data, t.tensor_type)
        assert ours.shape == reference.shape == (t.shape[1], t.shape[0])
        if t.tensor_type == T.Q6_K:
            assert (q["bits"], q["group_size"]) == (8, 32)
            step = np.abs(np.array(w.weights[f"{module}.scales"]))
            error = np.abs(ours - reference).reshape(*step.shape, 32)
            assert np.all(error <= step[..., None] / 2 + 2.0**-22 * np.abs(reference).max())
        else:
            assert (q["bits"], q["group_size"]) == (4, 32)
            assert np.array_equal(ours, reference), t.name
        target = EMBEDDING_SCALE if t.name == "token_embd.weight" else t.shape[0] ** -0.5
        assert reference.std() == pytest.approx(target, rel=0.1), t.name
        assert abs(reference.mean()) < 0.1 * target
        seen.add(t.tensor_type)
    assert seen == {T.Q4_K, T.Q6_K}


@pytest.mark.parametrize("mode", ["exact", "native-q4"])
def test_model_builds_and_runs_in_both_modes(mode):
    loaded = build_random_gguf_model(SHAPE, mode=mode, dtype="float16", seed=3)
    layers = {(m.bits, m.group_size) for _, m in loaded.model.named_modules() if hasattr(m, "bits")}
    assert layers == ({(4, 32), (8, 32)} if mode == "exact" else {(4, 64)})
    assert loaded.format == "gguf" and loaded.quantization.startswith("Q4_K_M")
    assert ("as MLX 4-bit g64" in loaded.quantization) == (mode == "native-q4")
    out = logits(loaded, [5, 9, 200, 31, 77, 400])
    assert np.isfinite(out).all()
    assert len(set(out.argmax(-1).tolist())) > 1  # not one token whatever the input
    params = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
    with Engine(loaded) as engine:  # our engine's greedy tokens are mlx-lm's on the same weights
        ours = [t for e in engine.generate([5, 9, 200, 31], params) for t in e.token_ids]
    with float32_rope():  # the same math as ours (float16 weights; see float32_rope)
        theirs = [t for t, _ in generate_step(mx.array([5, 9, 200, 31]), bench.mlx_lm_model(loaded), max_tokens=6)]
    assert ours == theirs


def test_native_q4_is_close_to_exact():
    """native-q4 re-quantizes the exact values: next-token logits stay close to exact mode's."""
    exact, native = (logits(build_random_gguf_model(SHAPE, mode=m, dtype="float32", seed=4), [7, 100, 3, 42, 250, 11])
                     for m in ("exact", "native-q4"))
    assert not np.array_equal(exact, native)
    assert np.abs(exact - native).max() < 0.5 * np.abs(exact).max()
    assert np.corrcoef(exact.ravel(), native.ravel())[0, 1] > 0.9


@pytest.mark.parametrize("mode", ["exact", "native-q4"])
def test_bench_end_to_end(tmp_path, capsys, mode):
    out = tmp_path / "out.json"
    status = cli.main(["bench", "--random-weights", SHAPE, "--random-gguf", "Q4_K_M", "--gguf-mode", mode,
                       "--dtype", "float32", "--concurrency", "1", "--requests", "2", "--prompt-tokens", "8",
                       "--gen-tokens", "4", "--runs", "1", "--warmup", "0", "--compare", "mlx-lm",
                       "--json", str(out)])
    assert status == 0, capsys.readouterr().err
    result = json.loads(out.read_text())
    assert result["config"]["format"] == "gguf"
    assert result["config"]["quantization"].startswith("Q4_K_M (random blocks)")
    for engine in ("mlxserve", "mlx-lm"):
        [entry] = result["results"][engine]["concurrency"]
        assert entry["runs"][0]["generated_tokens"] == 2 * 4
    [speedup] = result["speedups"]["concurrency"]
    assert all(speedup[f.key] > 0 for f in CLOSED_LOOP_FIGURES)


@pytest.mark.parametrize("args,needle", [
    (["--random-gguf", "Q4_K_M"], "--random-gguf applies to --random-weights"),
    (["--random-weights", SHAPE, "--random-gguf", "Q4_K_M", "--quantize", "4"], "--random-gguf and --quantize"),
    (["--random-weights", SHAPE, "--gguf-mode", "native-q4"], "add --random-gguf"),
    (["--random-weights", "tiny-qwen3.5", "--random-gguf", "Q4_K_M"], "qwen3_5"),
])
def test_bad_flags(args, needle, capsys):
    assert cli.main(["bench", *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and needle in err[0], err


def test_a_shape_without_a_gguf_layout_is_refused_naming_those_that_have_one():
    assert gguf_shapes() == ["qwen3-0.6b", "qwen3-4b", "tiny", "tiny-256"]
    with pytest.raises(ValueError, match=r"qwen3_5 shape 'tiny-qwen3.5'.*qwen3-0.6b, qwen3-4b, tiny, tiny-256"):
        build_random_gguf_model("tiny-qwen3.5")


def test_bench_help_names_the_shapes_random_gguf_has():
    bench_parser = cli.build_parser()._subparsers._group_actions[0].choices["bench"]
    [action] = [a for a in bench_parser._actions if "--random-gguf" in a.option_strings]
    assert f"--random-weights {', '.join(gguf_shapes()[:-1])} or {gguf_shapes()[-1]}:" in action.help
