"""Qwen3.5 (dense and MoE) against Hugging Face transformers' reference implementation.

The same tiny random checkpoint (Hugging Face's nested `Qwen3_5ForConditionalGeneration`
layout: 2 linear-attention + 2 full-attention layers, written by tests/tiny_models.py) is
loaded by transformers (torch CPU, float32, eager attention, the pure-torch gated-delta and
causal-conv1d fallbacks) and by mlxserve. Full-sequence logits must agree within LOGITS_ATOL,
in one pass and fed in small chunks, and greedy ids must be identical, including through the
engine with chunked prefill.
"""

import importlib.util

import mlx.core as mx
import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, GenerationConfig

from mlxserve.cache import KVStore, RowCache
from mlxserve.engine import Engine, EngineConfig
from mlxserve.loader import load_model
from mlxserve.runner import Feed, Runner
from mlxserve.sampling import SamplingParams
from mlxserve.scheduler import Request

# float32 on both sides; logits here reach ~6 and the measured max differences are 1e-5 to
# 2.3e-5 (summation order: MLX's gated-delta kernel vs transformers' 64-token chunked form,
# BLAS). 1e-4 leaves room for other BLAS builds and is far below a real mistake: giving the
# gated norm of one linear layer the (1 + w) convention moves the logits by ~4.
LOGITS_ATOL = 1e-4
NEW_TOKENS = 16
TEXT = "The capital of France is Paris. Once upon a time there was a tiny model that generated text."
# ~34 tokens, and ~100: the latter crosses transformers' 64-token gated-delta chunk boundary.
PROMPTS = {"short": TEXT, "long": TEXT * 3}


@pytest.fixture(scope="module", params=["qwen3_5", "qwen3_5_moe"])
def pair(request, tiny_model_dir):
    """(transformers model, mlxserve LoadedModel) from one checkpoint folder."""
    folder = tiny_model_dir(request.param)
    torch.manual_seed(0)
    ref, info = AutoModelForCausalLM.from_pretrained(
        folder, dtype=torch.float32, attn_implementation="eager", output_loading_info=True)
    # Every weight came from the checkpoint (none freshly initialised, none left unused but
    # the vision/MTP ones the text model ignores by design).
    assert not info["missing_keys"] and not info["mismatched_keys"], info
    assert {k for k in info["unexpected_keys"] if not k.startswith(("model.visual", "mtp."))} == set()
    return ref.eval(), load_model(str(folder), progress=False)


def test_reference_is_the_torch_fallback_with_the_tiny_layout(pair):
    """What the other tests compare against: transformers' pure-torch paths (no
    flash-linear-attention, no causal-conv1d kernels) on the hybrid 2 + 2 layout."""
    ref, loaded = pair
    assert importlib.util.find_spec("fla") is None and importlib.util.find_spec("causal_conv1d") is None
    assert {(p.device.type, p.dtype) for p in ref.parameters()} == {("cpu", torch.float32)}
    assert ref.config._attn_implementation == "eager"
    assert ref.config.layer_types == ["linear_attention", "full_attention"] * 2
    assert [layer.is_linear for layer in loaded.model.layers] == [True, False, True, False]
    assert type(ref).__name__ == ("Qwen3_5MoeForCausalLM" if loaded.model.args.num_experts else "Qwen3_5ForCausalLM")


def reference_logits(ref, ids) -> np.ndarray:
    with torch.no_grad():
        return ref(input_ids=torch.tensor([ids])).logits[0].numpy()


def our_logits(loaded, ids, chunk: int | None = None) -> np.ndarray:
    """Logits at every position, the prompt fed in one step or `chunk` tokens at a time
    (the conv window and recurrent state carried in the row's cache between chunks)."""
    layers, heads, dim = loaded.model.kv_shape()
    kv = KVStore(layers, heads, dim, mx.float32, block_size=16,
                 state_bytes_per_row=loaded.model.state_bytes_per_row())
    runner, row = Runner(loaded.model, kv), RowCache(kv)
    chunk = chunk or len(ids)
    parts = []
    for start in range(0, len(ids), chunk):
        piece = ids[start:start + chunk]
        row.reserve(len(piece))
        logits, _ = runner.forward([Feed("r", piece, start, row, "all")])
        row.extend(len(piece))
        mx.eval(logits)
        parts.append(np.array(logits))
    return np.concatenate(parts)


@pytest.mark.parametrize("prompt", PROMPTS)
def test_logits_match_transformers(pair, prompt):
    ref, loaded = pair
    ids = loaded.tokenizer.encode(PROMPTS[prompt])
    expected = reference_logits(ref, ids)
    assert expected.shape == (len(ids), loaded.model.args.vocab_size)
    for chunk in (None, 5):
        ours = our_logits(loaded, ids, chunk)
        diff = np.abs(ours - expected).max()
        assert diff < LOGITS_ATOL, (prompt, chunk, diff)
        assert (ours.argmax(-1) == expected.argmax(-1)).all()


def reference_greedy(ref, ids) -> list[int]:
    """transformers' generate, greedy, no stop on EOS: its cached decode path (conv update +
    recurrent gated-delta step) after a one-pass prefill."""
    # generate() fills every None in `config` from the model's generation_config (eos [0, 2]
    # from generation_config.json): clear it there too, or an EOS would end the reference early.
    ref.generation_config.eos_token_id = None
    config = GenerationConfig(do_sample=False, max_new_tokens=NEW_TOKENS, eos_token_id=None, pad_token_id=0)
    with torch.no_grad():
        out = ref.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                           generation_config=config)
    return out[0, len(ids):].tolist()


def engine_greedy(loaded, ids, **cfg) -> list[int]:
    params = SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0, ignore_eos=True)
    with Engine(loaded, EngineConfig(block_size=16, **cfg)) as engine:
        return [t for e in engine.submit(Request(list(ids), params)) for t in e.token_ids]


@pytest.mark.parametrize("prompt", PROMPTS)
def test_greedy_ids_match_transformers(pair, prompt):
    ref, loaded = pair
    ids = loaded.tokenizer.encode(PROMPTS[prompt])
    expected = reference_greedy(ref, ids)
    assert len(expected) == NEW_TOKENS
    assert engine_greedy(loaded, ids) == expected
    # chunked prefill (7 tokens a step) against transformers' single pass
    assert engine_greedy(loaded, ids, max_batch_tokens=7) == expected
