"""The real Qwen2.5-Coder-0.5B-Instruct Q4_K_M file (Q4_K, Q6_K, Q5_0, Q8_0 and F32 tensors).

Held to a float64 numpy forward pass built from ``gguf.quants.dequantize`` (numpy_qwen2.py),
tensor by tensor and logit by logit. Run with ``-s`` to see the figures the README quotes:

    python -m pytest -q -s -p no:cacheprovider tests/test_gguf_real.py
"""

from __future__ import annotations

import time

import mlx.core as mx
import numpy as np
import pytest
from numpy_qwen2 import Qwen2Reference
from tiny_models import prompt_logits

from mlxserve.engine import Engine
from mlxserve.loader import load_model
from mlxserve.quant.gguf_convert import convert_tensor
from mlxserve.quant.gguf_metadata import open_gguf
from mlxserve.sampling import SamplingParams

TEXT = (
    "def fibonacci(n):\n"
    '    """Return the n-th Fibonacci number."""\n'
    "    a, b = 0, 1\n"
    "    for _ in range(n):\n"
    "        a, b = b, a + b\n"
    "    return a\n\n"
    "The Fibonacci sequence shows up in nature: the arrangement of leaves on a stem, the "
    "branching of trees and the spirals of a pine cone all follow it."
)
POSITIONS = 64
CHAT = "Write a Python function that checks whether a number is prime."
GREEDY_TOKENS = 16
SCALE_SAMPLE = 12  # tensors per type whose float16 / bfloat16 scale rounding is measured


@pytest.fixture(scope="module")
def reference(qwen_coder_path):
    return Qwen2Reference(qwen_coder_path)


@pytest.fixture(scope="module")
def exact(qwen_coder_path):
    start = time.perf_counter()
    loaded = load_model(str(qwen_coder_path), progress=False)
    print(f"\nexact load: {time.perf_counter() - start:.2f} s ({loaded.quantization})")
    return loaded


@pytest.fixture(scope="module")
def text_ids(exact):
    ids = exact.tokenizer.encode(TEXT, add_special_tokens=False)
    assert len(ids) >= POSITIONS
    return ids[:POSITIONS]


@pytest.fixture(scope="module")
def reference_logits(reference, text_ids):
    return reference.forward(text_ids)


@pytest.fixture(scope="module")
def exact_logits(exact, text_ids):
    return model_logits(exact, text_ids)


def model_logits(loaded, ids) -> np.ndarray:
    """float64 logits [len(ids), vocab] of one forward pass over ``ids`` through our model."""
    return np.array(prompt_logits(loaded, ids)).astype(np.float64)


def log_softmax(logits: np.ndarray) -> np.ndarray:
    return logits - np.logaddexp.reduce(logits, axis=-1, keepdims=True)


def compare(expected: np.ndarray, got: np.ndarray, ids) -> dict:
    """Agreement figures of ``got`` against ``expected`` logits at every position."""
    lp_expected, lp_got = log_softmax(expected), log_softmax(got)
    top2 = np.sort(expected, axis=-1)[:, -2:]
    nexts = np.arange(len(ids) - 1), np.asarray(ids[1:])
    kl = np.sum(np.exp(lp_expected) * (lp_expected - lp_got), axis=-1)
    return {
        "same_top1": expected.argmax(-1) == got.argmax(-1),
        "clear": top2[:, 1] - top2[:, 0] >= 0.25,  # top-2 margin of the expected logits
        "next_dlogp": np.abs(lp_expected[nexts] - lp_got[nexts]),
        "max_logit_diff": float(np.abs(expected - got).max()),
        "kl": kl,
    }


def describe(name: str, c: dict) -> str:
    return (f"{name}: top-1 agreement {c['same_top1'].mean():.1%} "
            f"({c['same_top1'][c['clear']].mean():.1%} where margin >= 0.25, "
            f"{c['clear'].sum()} positions), mean |d log p(next)| {c['next_dlogp'].mean():.4f}, "
            f"max {c['next_dlogp'].max():.4f}; max |d logit| {c['max_logit_diff']:.4f}; "
            f"KL mean {c['kl'].mean():.2e}, max {c['kl'].max():.2e} nats")


# --- logits ------------------------------------------------------------------------------------

def test_logits_match_the_float64_reference(reference_logits, exact_logits, text_ids):
    c = compare(reference_logits, exact_logits, text_ids)
    print("\n" + describe(f"exact vs float64 reference, {POSITIONS} positions", c))
    assert np.all(c["same_top1"][c["clear"]])
    assert c["next_dlogp"].mean() <= 0.05


def test_native_q4_quality_against_exact(qwen_coder_path, exact_logits, reference_logits,
                                         text_ids):
    """native-q4's cost in quality, measured (the README quotes it); its floor asserted."""
    start = time.perf_counter()
    native = load_model(str(qwen_coder_path), progress=False, gguf_mode="native-q4")
    print(f"\nnative-q4 load: {time.perf_counter() - start:.2f} s ({native.quantization})")
    assert native.quantization == "Q4_K_M as MLX 4-bit g64"
    layers = [m for _, m in native.model.named_modules() if hasattr(m, "bits")]
    assert layers and all((m.bits, m.group_size) == (4, 64) for m in layers)
    native_logits = model_logits(native, text_ids)
    against_exact = compare(exact_logits, native_logits, text_ids)
    print(describe("native-q4 vs exact", against_exact))
    print(describe("native-q4 vs float64 reference",
                   compare(reference_logits, native_logits, text_ids)))
    assert against_exact["same_top1"][against_exact["clear"]].mean() >= 0.75
    assert against_exact["kl"].mean() <= 0.5


# --- chat --------------------------------------------------------------------------------------

def test_chat_greedy_continuation_matches_the_reference(exact, reference):
    tok = exact.tokenizer
    prompt = tok.encode(tok.apply_chat_template([{"role": "user", "content": CHAT}],
                                                add_generation_prompt=True),
                        add_special_tokens=False)
    with Engine(exact) as engine:
        events = engine.generate(prompt, SamplingParams(max_tokens=GREEDY_TOKENS,
                                                        temperature=0.0))
    ours = [t for e in events for t in e.token_ids]

    cache, expected, margins = reference.new_cache(), [], []
    logits = reference.forward(prompt, cache)[-1]
    while len(expected) < GREEDY_TOKENS:
        top2 = np.sort(logits)[-2:]
        margins.append(top2[1] - top2[0])
        expected.append(int(logits.argmax()))
        if expected[-1] in tok.eos_token_ids:
            break
        logits = reference.forward([expected[-1]], cache)[-1]
    print(f"\nchat greedy ({len(expected)} tokens, smallest reference top-2 margin "
          f"{min(margins):.3f}): {tok.decode(expected)!r}")
    assert ours == expected


# --- tensors -----------------------------------------------------------------------------------

def mlx_values(converted, scale_dtype=mx.float32) -> np.ndarray:
    """Dequantized in float32 from scales and biases rounded to ``scale_dtype``."""
    a = converted.arrays
    scales, biases = (a[k].astype(scale_dtype).astype(mx.float32) for k in ("scales", "biases"))
    return np.array(mx.dequantize(a["weight"], scales, biases, group_size=converted.group_size,
                                  bits=converted.bits))


def q6_k_steps(tensor) -> np.ndarray:
    """|d * sc| per value: each Q6_K value's own quantization step."""
    blocks = tensor.data.reshape(tensor.data.shape[0], -1, 210)
    d = blocks[..., 208:].copy().view(np.float16).astype(np.float64)  # [rows, supers, 1]
    sc = blocks[..., 192:208].view(np.int8).astype(np.float64)  # [rows, supers, 16]
    return np.repeat(np.abs(d * sc), 16, axis=-1).reshape(tensor.data.shape[0], -1)


class ErrorStats:
    """Error of an approximation of many tensors' values, accumulated tensor by tensor."""

    def __init__(self):
        self.n = self.exact = 0
        self.max = self.max_steps = self.sum = self.sum_steps = self.sum_sq = 0.0
        self.noise_sq = self.weight_sq = 0.0

    def add(self, approx: np.ndarray, truth: np.ndarray, steps: np.ndarray | None = None):
        error = np.abs(approx.astype(np.float64) - truth)
        self.n += error.size
        self.exact += int(np.sum(error == 0))
        self.max, self.sum = max(self.max, float(error.max())), self.sum + float(error.sum())
        self.sum_sq += float(np.sum(error**2))
        self.weight_sq += float(np.sum(truth.astype(np.float64) ** 2))
        if steps is not None:
            in_steps = error / np.where(steps > 0, steps, 1)
            self.max_steps = max(self.max_steps, float(in_steps.max()))
            self.sum_steps += float(in_steps.sum())
            self.noise_sq += float(np.sum(steps**2 / 12))  # Q6_K's own rounding noise

    def row(self, name: str) -> str:
        text = (f"  {name:<28} max {self.max:.2e}  mean {self.sum / self.n:.2e}  "
                f"RMS / weight RMS {np.sqrt(self.sum_sq / self.weight_sq):.2e}  "
                f"exact {self.exact / self.n:.1%}")
        if self.noise_sq:
            text += (f"  in Q6_K steps: max {self.max_steps:.2f}, mean "
                     f"{self.sum_steps / self.n:.4f}; RMS / Q6_K's own rounding noise "
                     f"{np.sqrt(self.sum_sq / self.noise_sq):.3f}")
        return text


def test_tensors_match_gguf_dequantize(qwen_coder_path, reference):
    """Every quantized layer tensor against gguf's values (the reference's weights are
    gguf.quants.dequantize's): Q4_K, Q5_0 and Q8_0 exactly with float32 scales; float16 and
    bfloat16 scales measured; Q6_K measured against the other forms it could take."""
    by_type: dict[str, list] = {}
    for t in open_gguf(qwen_coder_path).tensors:
        if t.name.startswith("blk.") and t.name.endswith(".weight") and t.data.ndim == 2:
            by_type.setdefault(t.tensor_type.name, []).append(t)
    assert set(by_type) == {"Q4_K", "Q6_K", "Q5_0", "Q8_0"}

    print()
    q6_k = {name: ErrorStats() for name in (
        "ours: 8-bit g32 (exact mode)", "mx.quantize 8-bit g32", "mx.quantize 6-bit g32",
        "float16 values", "bfloat16 values")}
    for kind, tensors in sorted(by_type.items()):
        scale_errors = {"float16": ErrorStats(), "bfloat16": ErrorStats()}
        for i, tensor in enumerate(tensors):
            _, layer, name, _ = tensor.name.split(".")
            truth = reference.layers[int(layer)][name]
            converted = convert_tensor(tensor, mx.float32)
            ours = mlx_values(converted)
            if kind != "Q6_K":
                assert np.array_equal(ours, truth), tensor.name
            if i < SCALE_SAMPLE:
                for dtype, stats in scale_errors.items():
                    stats.add(mlx_values(converted, getattr(mx, dtype)), ours)
            if kind == "Q6_K":
                steps = q6_k_steps(tensor)
                q6_k["ours: 8-bit g32 (exact mode)"].add(ours, truth, steps)
                for bits in (8, 6):
                    packed = mx.quantize(mx.array(truth), group_size=32, bits=bits)
                    q6_k[f"mx.quantize {bits}-bit g32"].add(
                        np.array(mx.dequantize(*packed, group_size=32, bits=bits)), truth, steps)
                q6_k["float16 values"].add(truth.astype(np.float16), truth, steps)
                q6_k["bfloat16 values"].add(
                    np.array(mx.array(truth).astype(mx.bfloat16).astype(mx.float32)), truth, steps)
        print(f"{kind}, {min(len(tensors), SCALE_SAMPLE)} tensors: scales and biases rounded to")
        for dtype, stats in scale_errors.items():
            print(stats.row(dtype))
        if kind in ("Q5_0", "Q8_0"):  # their scales and biases are float16 numbers
            assert scale_errors["float16"].max == 0

    print(f"Q6_K, {len(by_type['Q6_K'])} tensors, against gguf's values:")
    for name, stats in q6_k.items():
        print(stats.row(name))
    ours = q6_k["ours: 8-bit g32 (exact mode)"]
    for name in ("mx.quantize 8-bit g32", "mx.quantize 6-bit g32"):
        other = q6_k[name]
        assert ours.sum < other.sum and ours.sum_sq < other.sum_sq and ours.exact > other.exact
        # Per group our step is the larger sub-block's over an integer k: at most 5/4 of the
        # finest step covering the group (255 codes over its span).
        assert ours.max <= 1.25 * other.max
