"""Our model classes against mlx-lm's on the same weights: greedy ids must be identical."""

import mlx.core as mx
import pytest
from mlx_lm.generate import generate_step
from mlx_lm.utils import load_model as mlx_lm_load_model

from mlxserve.engine import Engine, EngineConfig
from mlxserve.loader import load_model
from mlxserve.sampling import SamplingParams

PROMPT = "The capital of France is"


def reference_greedy(folder, prompt_ids, n):
    model, _ = mlx_lm_load_model(folder)
    out = []
    for token, _ in generate_step(mx.array(prompt_ids), model, max_tokens=n, sampler=lambda x: mx.argmax(x, axis=-1)):
        out.append(int(token))
    return out


def our_greedy(folder, prompt_ids, n, **engine_kw):
    loaded = load_model(str(folder), progress=False)
    with Engine(loaded, EngineConfig(**engine_kw)) as engine:
        events = engine.generate(prompt_ids, SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True))
    return [t for e in events for t in e.token_ids], events[-1]


@pytest.mark.parametrize("arch", ["qwen3", "llama", "qwen2"])
@pytest.mark.parametrize("dtype,bits", [("float32", None), ("bfloat16", None), ("float32", 4)])
def test_greedy_ids_match_mlx_lm(tiny_model_dir, arch, dtype, bits):
    folder = tiny_model_dir(arch, dtype, bits)
    loaded = load_model(str(folder), progress=False)
    prompt_ids = loaded.tokenizer.encode(PROMPT)
    expected = reference_greedy(folder, prompt_ids, 24)
    ours, final = our_greedy(folder, prompt_ids, 24, block_size=16)
    assert ours == expected
    assert final.finish_reason == "length"
    assert final.completion_tokens == 24
    assert final.prompt_tokens == len(prompt_ids)


def test_quantized_model_is_really_quantized(tiny_model_dir):
    import mlx.nn as nn

    loaded = load_model(str(tiny_model_dir("qwen3", "float32", 4)), progress=False)
    qkv = loaded.model.layers[0].self_attn.qkv_proj  # q, k and v fused into one matmul
    assert isinstance(qkv, nn.QuantizedLinear) and qkv.bits == 4
    assert isinstance(loaded.model.layers[0].mlp.gate_up_proj, nn.QuantizedLinear)
    assert loaded.quantization == "4-bit g32"


def test_chunked_prefill_and_block_sizes_do_not_change_greedy_ids(tiny_model_dir):
    folder = tiny_model_dir("llama", "float32")
    loaded = load_model(str(folder), progress=False)
    prompt_ids = loaded.tokenizer.encode(" ".join(["Once upon a time there was a tiny model."] * 4))
    expected = reference_greedy(folder, prompt_ids, 12)
    for chunk in (1, 7, 64):
        for block_size in (4, 16):
            ours, _ = our_greedy(folder, prompt_ids, 12, max_batch_tokens=chunk, block_size=block_size)
            assert ours == expected, (chunk, block_size)
