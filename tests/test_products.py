"""Linear layers whose multi-row products run as width-one convolutions (models/products.py)
compute what the plain layers compute, in decoding steps and steps with prefill chunks, for
the dense and the hybrid family, compiled and eager."""

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

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
