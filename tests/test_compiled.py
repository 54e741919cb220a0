"""The compiled per-layer pieces (models/compiled.py) compute what the eager code computes,
for every model family, in small steps and in steps padded to a bucket size, and never mix up
models."""

import gc
import threading

import mlx.core as mx
import numpy as np
import pytest

from mlxserve.cache import KVStore, RowCache
from mlxserve.engine import _acquire_worker, _release_worker
from mlxserve import random_weights
from mlxserve.models import compiled
from mlxserve.random_weights import build_random_model
from mlxserve.runner import Feed, Runner


def logits(loaded) -> np.ndarray:
    """Logits of four rows each decoding two tokens after their prompts (three rows on one
    shelf, one on another: two attention groups; a hybrid model's recurrence gathers the
    rows' states from their prompts' batches at the first step and takes its own batches
    whole at the second), then of a step in which two of them decode and a new row prefills a
    chunk beside them. Prompts and the mixed step run padded to a bucket size when compiling
    is enabled (the padding attending as extra queries of the chunk)."""
    model = loaded.model
    layers, heads, dim = model.kv_shape()
    state = model.state_bytes_per_row() if hasattr(model, "state_bytes_per_row") else 0
    kv = KVStore(layers, heads, dim, mx.float32, block_size=16, state_bytes_per_row=state)
    runner = Runner(model, kv)
    rows = [RowCache(kv) for _ in range(4)]
    prompts = [list(range(1, 20)), list(range(5, 12)), list(range(30, 70)), list(range(2, 82))]
    for key, (row, prompt) in enumerate(zip(rows, prompts)):
        row.reserve(len(prompt) + 2)
        runner.forward([Feed(key, prompt, 0, row, "none")])
        row.extend(len(prompt))
    decoded = []
    for token in (3, 5):
        step = [Feed(key, [key + token], row.length, row, "last") for key, row in enumerate(rows)]
        out, batch = runner.forward(step)
        assert batch.max_tokens_per_row <= compiled.MAX_TOKENS_PER_ROW and not batch.padding
        assert len(batch.groups) == 2
        decoded.append(np.array(out))
        for row in rows:
            row.extend(1)
    newcomer = RowCache(kv)
    newcomer.reserve(23)
    mixed = [Feed(key, [key + 7], row.length, row, "last") for key, row in enumerate(rows[:2])]
    mixed.append(Feed(9, list(range(40, 63)), 0, newcomer, "last"))
    mixed_out, batch = runner.forward(mixed)
    bucket = compiled.multi_token_bucket()
    assert batch.padding == (-25 % bucket if bucket else 0) and batch.compile == (bucket is not None)
    # The padding attends as extra queries of the chunk's row (the last group), not as rows
    # concatenated to the attention output.
    chunk = batch.groups[-1]
    assert chunk.extra_queries == batch.padding
    assert chunk.mask.shape[2] == 23 + batch.padding
    return np.concatenate([*decoded, np.array(mixed_out)])


def on_another_thread(fn, *args):
    """fn(*args) on one of the engine's worker threads: a thread that lives on, as the
    engine's do (so its trace cache outlives the model), and that never exits during the run
    (a thread that used MLX and exits can abort the process at shutdown, see engine.py)."""
    result = {}
    done = threading.Event()

    def job():
        try:
            result["value"] = fn(*args)
        finally:
            done.set()

    worker = _acquire_worker()
    worker.run(job)
    done.wait()
    _release_worker(worker)
    return result["value"]


@pytest.mark.parametrize("shape", ["tiny", "tiny-qwen3.5", "tiny-qwen3.5-linear-last"])
def test_compiled_pieces_compute_what_eager_code_computes(shape, monkeypatch):
    if shape == "tiny-qwen3.5-linear-last":
        # Linear, full, linear: the last piece of a decoding step ends in a traced recurrence.
        config = dict(random_weights.SHAPES["tiny-qwen3.5"], num_hidden_layers=3,
                      layer_types=["linear_attention", "full_attention", "linear_attention"])
        monkeypatch.setitem(random_weights.SHAPES, shape, config)
    loaded = build_random_model(shape, dtype="float32")
    monkeypatch.setattr(compiled, "enabled", False)
    eager = logits(loaded)
    monkeypatch.setattr(compiled, "enabled", True)
    np.testing.assert_allclose(logits(loaded), eager, atol=1e-5, rtol=0)
    assert loaded.model.layers[0].__dict__, "the compiled path was not taken"
    if shape.startswith("tiny-qwen3.5"):
        # Decoding steps ran the recurrence inside pieces spanning layers (llama.run_layers).
        assert any(name.startswith("_compiled_span") for layer in loaded.model.layers for name in layer.__dict__)


@pytest.mark.parametrize("shape", ["tiny", "tiny-qwen3.5"])
def test_the_cpu_runs_prefill_steps_eagerly_at_their_own_size(shape, monkeypatch):
    """By default (pad_multi_token_steps None) a CPU step with a prefill chunk is not padded
    and runs eagerly, decoding steps still compiled; the logits are the padded ones'."""
    loaded = build_random_model(shape, dtype="float32")
    padded = logits(loaded)
    monkeypatch.setattr(compiled, "pad_multi_token_steps", None)
    assert mx.default_device() == mx.cpu and compiled.multi_token_bucket() is None
    np.testing.assert_allclose(logits(loaded), padded, atol=1e-5, rtol=0)
    monkeypatch.setattr(compiled, "pad_multi_token_steps", False)
    assert compiled.multi_token_bucket() is None
    monkeypatch.setattr(compiled, "pad_multi_token_steps", True)
    assert compiled.multi_token_bucket() == compiled.MULTI_TOKEN_BUCKET


@pytest.mark.parametrize("shape", ["tiny", "tiny-qwen3.5"])
def test_a_freed_model_never_answers_for_a_later_one(shape, monkeypatch):
    """MLX caches traces per thread by the compiled function's address. Models used from two
    threads, then freed, must not leave traces that a later model (whose functions may get the
    same addresses) would replay with the old weights."""
    for seed in range(6):
        loaded = build_random_model(shape, dtype="float32", seed=seed)
        monkeypatch.setattr(compiled, "enabled", False)
        eager = logits(loaded)
        monkeypatch.setattr(compiled, "enabled", True)
        np.testing.assert_allclose(logits(loaded), eager, atol=1e-5, rtol=0)
        np.testing.assert_allclose(on_another_thread(logits, loaded), eager, atol=1e-5, rtol=0)
        del loaded
        gc.collect()
