"""Linear layers whose multi-row products run another way (models/products.py: plain layers as
width-one convolutions, quantized ones with their weight dequantized first) compute what the
layers they replace compute, in decoding steps and steps with prefill chunks, for the dense
and the hybrid family; and an engine makes the quantized swap on a CUDA GPU only."""

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

from mlxserve import engine
from mlxserve.models import compiled, products
from mlxserve.random_weights import build_random_model
from test_compiled import logits


def test_conv_linear_is_the_plain_product_for_any_row_count():
    layer = nn.Linear(48, 80, bias=True)
    conv = products.ConvLinear.__new__(products.ConvLinear)
    nn.Module.__init__(conv)
    conv.weight, conv.bias = layer.weight, layer.bias
    for shape in ((1, 48), (48,), (5, 48), (3, 4, 48), (2, 1, 48)):
        x = mx.random.normal(shape)
        np.testing.assert_allclose(np.array(conv(x)), np.array(layer(x)), atol=1e-5, rtol=0)


@pytest.mark.parametrize("shape", ["tiny", "tiny-qwen3.5"])
@pytest.mark.parametrize("compile_steps", [False, True])
def test_models_with_conv_products_compute_what_plain_ones_compute(shape, compile_steps, monkeypatch):
    monkeypatch.setattr(compiled, "enabled", compile_steps)
    plain = build_random_model(shape, dtype="float32")
    expected = logits(plain)
    monkeypatch.setattr(products, "enabled", True)
    swapped = build_random_model(shape, dtype="float32")
    kinds = {type(m) for m in swapped.model.modules()}
    assert products.ConvLinear in kinds and nn.Linear not in kinds
    np.testing.assert_allclose(logits(swapped), expected, atol=1e-4, rtol=0)


def test_quantizing_a_model_with_conv_products_quantizes_those_layers(monkeypatch):
    monkeypatch.setattr(products, "enabled", True)
    loaded = build_random_model("tiny", dtype="float32", quantize=4)
    kinds = {type(m) for m in loaded.model.modules()}
    assert nn.QuantizedLinear in kinds and products.ConvLinear not in kinds


def _quantized_layer(bias: bool) -> nn.QuantizedLinear:
    return nn.QuantizedLinear.from_linear(nn.Linear(128, 96, bias=bias), group_size=64, bits=4)


def _count_dequantizations(monkeypatch) -> list:
    """A list that gets an item at every mx.dequantize call (in a compiled piece: at its trace)."""
    called = []
    real_dequantize = mx.dequantize
    monkeypatch.setattr(mx, "dequantize", lambda *a, **k: called.append(1) or real_dequantize(*a, **k))
    return called


@pytest.mark.parametrize("bias", [False, True])
def test_dequantizing_linear_computes_the_quantized_product(bias, monkeypatch):
    layer = _quantized_layer(bias)
    shapes = ((1, 128), (7, 128), (8, 128), (2, 5, 128))
    inputs = [mx.random.normal(shape) for shape in shapes]
    expected = [np.array(layer(x)) for x in inputs]
    assert products.use_dequantizing_products(layer) == 1
    assert type(layer) is products.DequantizingLinear
    called = _count_dequantizations(monkeypatch)
    monkeypatch.setattr(products, "DEQUANTIZE_FROM_ROWS", 8)
    for x, want in zip(inputs, expected):
        called.clear()
        got = layer(x)
        assert got.dtype == x.dtype
        if x.size // 128 >= 8:
            assert called
            np.testing.assert_allclose(np.array(got), want, atol=1e-5, rtol=0)
        else:  # MLX's quantized kernel, as before: the very same numbers
            assert not called
            np.testing.assert_array_equal(np.array(got), want)


def test_use_dequantizing_products_changes_only_quantized_linear_layers():
    loaded = build_random_model("tiny", dtype="float32", quantize=4)
    before = [type(m) for m in loaded.model.modules()]
    changed = products.use_dequantizing_products(loaded.model)
    after = [type(m) for m in loaded.model.modules()]
    assert changed == before.count(nn.QuantizedLinear) > 0
    assert nn.QuantizedLinear not in after
    assert [a for a, b in zip(after, before) if a is not b] == [products.DequantizingLinear] * changed
    assert products.use_dequantizing_products(loaded.model) == 0  # already done


@pytest.mark.parametrize("shape", ["tiny", "tiny-qwen3.5"])
def test_quantized_models_with_dequantized_prefill_compute_what_they_computed(shape, monkeypatch):
    monkeypatch.setattr(compiled, "pad_multi_token_steps", True)  # the GPU's way: compiled, padded
    expected = logits(build_random_model(shape, dtype="float32", quantize=4))
    # The same weights in new layers: their compiled pieces are traced afresh.
    loaded = build_random_model(shape, dtype="float32", quantize=4)
    assert products.use_dequantizing_products(loaded.model) > 0
    monkeypatch.setattr(products, "DEQUANTIZE_FROM_ROWS", 2)  # every step but single-row decoding ones
    called = _count_dequantizations(monkeypatch)
    np.testing.assert_allclose(logits(loaded), expected, atol=1e-4, rtol=0)
    assert called


@pytest.mark.parametrize("cuda", [False, True])
def test_an_engine_dequantizes_products_of_many_rows_on_a_cuda_gpu_only(cuda, monkeypatch):
    monkeypatch.setattr(engine, "on_cuda", lambda: cuda)
    loaded = build_random_model("tiny", dtype="float32", quantize=4)
    engine.make_scheduler(loaded, engine.EngineConfig())
    kinds = {type(m) for m in loaded.model.modules()}
    assert (products.DequantizingLinear in kinds) == cuda
    assert (nn.QuantizedLinear in kinds) != cuda
