"""Qwen3.5 (hybrid linear + full attention): the model against mlx-lm's qwen3_5 on the same
weights, the gated delta rule's three forms against each other, and every scheduler path
(chunked prefill, batching, prefix cache, preemption, snapshot/restore) against a row alone."""

import json
import logging

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten
from mlx_lm.generate import generate_step
from mlx_lm.utils import load_model as mlx_lm_load_model

from mlxserve.cache import KVStore, RowCache
from mlxserve.engine import Engine, EngineConfig, make_scheduler
from mlxserve.loader import load_model
from mlxserve.models.gated_delta import gated_delta, gated_delta_chunked, gated_delta_reference, gated_delta_step
from mlxserve.models.qwen3_5 import _conv_step, _conv_taps, _depthwise_conv
from mlxserve.runner import Feed, Runner
from mlxserve.sampling import SamplingParams
from mlxserve.scheduler import Request

GREEDY = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)
TEXT = "The capital of France is Paris. Once upon a time there was a tiny model that generated text."


@pytest.fixture(scope="module", params=["qwen3_5", "qwen3_5_moe"])
def hybrid(request, tiny_model_dir):
    folder = tiny_model_dir(request.param)
    return folder, load_model(str(folder), progress=False)


def reference_greedy(folder, prompt_ids, n):
    model, _ = mlx_lm_load_model(folder)
    steps = generate_step(mx.array(prompt_ids), model, max_tokens=n, sampler=lambda x: mx.argmax(x, axis=-1))
    return [int(token) for token, _ in steps]


def generate(loaded, prompts, params=GREEDY, **cfg):
    with Engine(loaded, EngineConfig(**cfg)) as engine:
        streams = [engine.submit(Request(p, params)) for p in prompts]
        finals, outputs = [], []
        for stream in streams:
            events = list(stream)
            outputs.append([t for e in events for t in e.token_ids])
            finals.append(events[-1])
    return outputs, finals


def all_logits(loaded, ids, block_size=16):
    layers, heads, dim = loaded.model.kv_shape()
    kv = KVStore(layers, heads, dim, mx.float32, block_size=block_size,
                 state_bytes_per_row=loaded.model.state_bytes_per_row())
    runner = Runner(loaded.model, kv)
    row = RowCache(kv)
    row.reserve(len(ids))
    logits, _ = runner.forward([Feed("r", list(ids), 0, row, "all")])
    row.extend(len(ids))
    return logits, runner, row


def test_logits_and_greedy_ids_match_mlx_lm(hybrid):
    folder, loaded = hybrid
    ids = loaded.tokenizer.encode(TEXT)
    ref_model, _ = mlx_lm_load_model(folder)
    expected_logits = ref_model(mx.array(ids)[None])[0]
    ours, _, _ = all_logits(loaded, ids)
    assert mx.abs(ours - expected_logits).max().item() < 1e-4
    assert reference_greedy(folder, ids, 20) == generate(loaded, [ids], SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True))[0][0]


def test_loading_honours_layer_types_and_drops_vision_and_mtp(hybrid, caplog):
    folder, loaded = hybrid
    kinds = ["linear" if layer.is_linear else "full" for layer in loaded.model.layers]
    assert kinds == ["linear", "full", "linear", "full"]
    assert loaded.model.kv_shape()[0] == 2
    with caplog.at_level(logging.INFO, logger="mlxserve.models"):
        load_model(str(folder), progress=False)
    assert any("ignoring weights" in r.message and "mtp" in r.message and "visual" in r.message for r in caplog.records)


def test_mlx_converted_layout_gives_the_same_logits(hybrid, tmp_path):
    """An mlx-lm-converted checkpoint (norms already 1 + w, conv1d as [C, K, 1]) must load to
    the same model: the +1 is applied exactly once."""
    folder, loaded = hybrid
    from mlxserve.loader import build_model

    config = json.loads((folder / "config.json").read_text())
    weights = mx.load(str(folder / "model.safetensors"))
    unfused = build_model(dict(config), dict(weights), None, fuse=False)
    converted = {"language_model." + k: v for k, v in tree_flatten(unfused.parameters())}
    assert any(k.endswith("conv1d.weight") and v.shape[-1] == 1 for k, v in converted.items())
    (tmp_path / "config.json").write_text(json.dumps(config))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (tmp_path / name).write_text((folder / name).read_text())
    mx.save_safetensors(str(tmp_path / "model.safetensors"), converted)
    ids = loaded.tokenizer.encode(TEXT)
    again = load_model(str(tmp_path), progress=False)
    a, _, _ = all_logits(loaded, ids)
    b, _, _ = all_logits(again, ids)
    assert mx.array_equal(a, b)


@pytest.mark.parametrize("T", [1, 5, 64, 150])
def test_gated_delta_forms_agree(T):
    rng = np.random.default_rng(T)
    B, Hk, Hv, Dk, Dv = 2, 2, 4, 32, 16
    q = mx.array(0.2 * rng.standard_normal((B, T, Hk, Dk)), dtype=mx.float32)
    k = rng.standard_normal((B, T, Hk, Dk))
    k = mx.array(k / np.linalg.norm(k, axis=-1, keepdims=True), dtype=mx.float32)
    v = mx.array(rng.standard_normal((B, T, Hv, Dv)), dtype=mx.float32)
    g = mx.array(rng.uniform(0.3, 1.0, (B, T, Hv)), dtype=mx.float32)
    beta = mx.array(rng.uniform(0.0, 1.0, (B, T, Hv)), dtype=mx.float32)
    state = mx.array(0.1 * rng.standard_normal((B, Hv, Dv, Dk)), dtype=mx.float32)
    y_ref, s_ref = gated_delta_reference(q, k, v, g, beta, state)
    fast = mx.fast.gated_delta_update(q, k, v, g, beta, state)
    for y, s in (gated_delta_chunked(q, k, v, g, beta, state), gated_delta(q, k, v, g, beta, state), fast):
        assert mx.abs(y - y_ref).max().item() < 1e-5
        assert mx.abs(s - s_ref).max().item() < 1e-5


@pytest.mark.parametrize("beta_value", [0.5, 0.9, 1.0])
def test_chunked_form_holds_on_a_run_of_identical_keys(beta_value):
    """A repeated token gives identical unit keys (k.k = 1): the chunk's triangular system then
    has entries of order one, where an inverse built from a Neumann product cancelled
    catastrophically (outputs off by 1e9)."""
    rng = np.random.default_rng(1)
    B, T, H, D = 1, 130, 2, 16
    k = mx.full((B, T, H, D), 0.25)  # unit length
    q = mx.array(rng.standard_normal((B, T, H, D)), dtype=mx.float32)
    v = mx.array(rng.standard_normal((B, T, H, D)), dtype=mx.float32)
    g, beta = mx.full((B, T, H), 0.99), mx.full((B, T, H), beta_value)
    state = mx.zeros((B, H, D, D))
    y_ref, s_ref = gated_delta_reference(q, k, v, g, beta, state)
    y, s = gated_delta_chunked(q, k, v, g, beta, state)
    assert mx.abs(y - y_ref).max().item() < 1e-4
    assert mx.abs(s - s_ref).max().item() < 1e-4


def test_a_prompt_of_one_repeated_token_gives_the_same_ids_at_any_chunk_size(hybrid):
    _, loaded = hybrid
    ids = [10] * 99
    expected = generate(loaded, [ids], block_size=16, max_batch_tokens=1)[0][0]
    for chunk in (16, 55, 64, 512):
        assert generate(loaded, [ids], block_size=16, max_batch_tokens=chunk)[0][0] == expected, chunk


def test_the_one_token_step_matches_the_reference_compiled():
    """gated_delta_step, as the decode path runs it (compiled; g and beta already in their
    broadcast shape), against the token-by-token definition, with two value heads per key
    head."""
    rng = np.random.default_rng(7)
    B, Hk, Hv, Dk, Dv = 3, 2, 4, 32, 16
    q = mx.array(0.2 * rng.standard_normal((B, 1, Hk, Dk)), dtype=mx.float32)
    k = rng.standard_normal((B, 1, Hk, Dk))
    k = mx.array(k / np.linalg.norm(k, axis=-1, keepdims=True), dtype=mx.float32)
    v = mx.array(rng.standard_normal((B, 1, Hv, Dv)), dtype=mx.float32)
    g = mx.array(rng.uniform(0.3, 1.0, (B, 1, Hv)), dtype=mx.float32)
    beta = mx.array(rng.uniform(0.0, 1.0, (B, 1, Hv)), dtype=mx.float32)
    state = mx.array(0.1 * rng.standard_normal((B, Hv, Dv, Dk)), dtype=mx.float32)
    y_ref, s_ref = gated_delta_reference(q, k, v, g, beta, state)
    shaped = (B, Hk, Hv // Hk, 1, 1)
    qk = mx.concatenate([q[:, 0], k[:, 0]], axis=1)
    y, s = mx.compile(gated_delta_step)(qk, v[:, 0], g.reshape(shaped), beta.reshape(shaped), state)
    assert y.dtype == mx.float32 and y.shape == (B, Hv, Dv)
    assert mx.abs(y - y_ref[:, 0]).max().item() < 1e-5
    assert mx.abs(s - s_ref).max().item() < 1e-5


@pytest.mark.parametrize("K", [2, 3, 4, 5])
def test_the_one_token_convolution_is_the_windowed_one_exactly(K):
    """_conv_step (decoding) computes silu of what _depthwise_conv over the K-long window does,
    bit for bit, and returns the last K-1 inputs as the next window."""
    rng = np.random.default_rng(3)
    n, C = 3, 24
    window = mx.array(rng.standard_normal((n, K - 1, C)), dtype=mx.float32)
    x = mx.array(rng.standard_normal((n, 1, C)), dtype=mx.bfloat16)
    weight = mx.array(rng.standard_normal((C, K, 1)), dtype=mx.bfloat16)
    full = mx.concatenate([window, x.astype(mx.float32)], axis=1)
    out, new = mx.compile(_conv_step)(window, x, _conv_taps(weight))
    assert mx.array_equal(out, nn.silu(_depthwise_conv(full, weight, 1)))
    assert mx.array_equal(new, full[:, 1:])


def test_chunk_sizes_do_not_change_greedy_ids(hybrid):
    _, loaded = hybrid
    ids = loaded.tokenizer.encode(TEXT * 2)
    expected = generate(loaded, [ids], block_size=16)[0][0]
    for chunk in (1, 7, 64):
        assert generate(loaded, [ids], block_size=16, max_batch_tokens=chunk)[0][0] == expected, chunk


def test_concurrent_rows_match_each_alone(hybrid):
    _, loaded = hybrid
    prompts = [loaded.tokenizer.encode(t) for t in (TEXT, "Hello world!", TEXT[:40], "def add(a, b):")]
    alone = [generate(loaded, [p], block_size=16)[0][0] for p in prompts]
    together, _ = generate(loaded, prompts, block_size=16, max_batch_tokens=24)
    assert together == alone


def test_prefix_cache_reuses_recurrent_state(hybrid):
    """The second request with the same long prefix starts from a cached block (KV and
    recurrent state) and produces what it produces without the cache."""
    _, loaded = hybrid
    first = loaded.tokenizer.encode(TEXT * 3)
    second = first + loaded.tokenizer.encode(" And then?")
    without, _ = generate(loaded, [second], block_size=16, prefix_cache=False)
    with Engine(loaded, EngineConfig(block_size=16)) as engine:
        list(engine.submit(Request(first, GREEDY)))
        events = list(engine.submit(Request(second, GREEDY)))
    assert [t for e in events for t in e.token_ids] == without[0]
    assert events[-1].cached_tokens >= len(first) // 16 * 16 - 16 > 0


def test_chat_second_turn_reuses_the_first(hybrid):
    _, loaded = hybrid
    tok = loaded.tokenizer
    turn1 = tok.encode(tok.apply_chat_template([{"role": "user", "content": TEXT}], add_generation_prompt=True))
    with Engine(loaded, EngineConfig(block_size=16)) as engine:
        answer = [t for e in engine.submit(Request(turn1, GREEDY)) for t in e.token_ids]
        turn2 = turn1 + answer + tok.encode("<|im_end|>\n<|im_start|>user\nWhy?<|im_end|>\n<|im_start|>assistant\n")
        events = list(engine.submit(Request(turn2, GREEDY)))
    assert events[-1].cached_tokens >= len(turn1) // 16 * 16
    assert [t for e in events for t in e.token_ids] == generate(loaded, [turn2], block_size=16, prefix_cache=False)[0][0]


def test_preemption_changes_no_output(hybrid):
    _, loaded = hybrid
    prompts = [loaded.tokenizer.encode(t) for t in (TEXT, TEXT[10:], TEXT[20:])]
    params = SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True)
    alone = [generate(loaded, [p], params, block_size=16)[0][0] for p in prompts]
    kv_per_token = 2 * loaded.model.kv_shape()[0] * loaded.model.kv_shape()[1] * loaded.model.kv_shape()[2] * 4
    slot = 128 * kv_per_token + 3 * loaded.model.state_bytes_per_row()  # a row's final slot
    with Engine(loaded, EngineConfig(block_size=16, memory_budget_bytes=int(2.5 * slot))) as engine:
        streams = [engine.submit(Request(p, params)) for p in prompts]
        together = [[t for e in s for t in e.token_ids] for s in streams]
        preemptions = engine.stats()["preemptions"]
    assert together == alone
    assert preemptions > 0


def test_preempted_row_whose_kept_slot_is_evicted_recomputes_from_a_fresh_state(hybrid):
    """A preempted row's slot goes to the prefix cache; when it is evicted before the row is
    admitted again, the row recomputes from position 0, so from an empty recurrent state,
    not from the state it had when preempted."""
    _, loaded = hybrid
    prompt = loaded.tokenizer.encode(TEXT)
    params = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
    alone = generate(loaded, [prompt], params, block_size=16)[0][0]
    sched = make_scheduler(loaded, EngineConfig(block_size=16))
    sched.add(Request(prompt, params))
    outputs = []
    plan = sched._plan

    def preempting_plan():
        # Where the scheduler preempts (_reserve, within _plan), once 8 tokens are out; then
        # memory pressure evicts every kept slot before the row comes back.
        if len(outputs) >= 8 and not sched.stats.preemptions:
            sched._preempt(sched.running[0])
            while sched.prefix.evict():
                pass
        return plan()

    sched._plan = preempting_plan
    while sched.has_work():
        for event in sched.step():
            outputs += event.token_ids
    assert sched.stats.preemptions == 1
    assert outputs == alone


def test_snapshot_restore_round_trip(hybrid):
    """Feed, snapshot, feed more, restore, feed the same again: identical logits. Trim alone
    cannot roll back a recurrent state; restore must."""
    _, loaded = hybrid
    ids = loaded.tokenizer.encode(TEXT)
    _, runner, row = all_logits(loaded, ids[:20])
    snap = row.snapshot()
    row.reserve(5)
    first, _ = runner.forward([Feed("r", ids[20:25], row.length, row, "all")])
    row.extend(5)
    mx.eval(first)
    row.restore(snap)
    assert row.length == 20
    again, _ = runner.forward([Feed("r", ids[20:25], row.length, row, "all")])
    assert mx.array_equal(first, again)


def test_state_memory_is_accounted(hybrid):
    _, loaded = hybrid
    per_row = loaded.model.state_bytes_per_row()
    args = loaded.model.args
    conv_dim = 2 * args.linear_num_key_heads * args.linear_key_head_dim + args.linear_num_value_heads * args.linear_value_head_dim
    # The conv window counts K rows: a decoding row's window is a view of a K-row array.
    window_rows = args.linear_conv_kernel_dim
    one_layer = 4 * (window_rows * conv_dim + args.linear_num_value_heads * args.linear_value_head_dim * args.linear_key_head_dim)
    assert per_row == 2 * one_layer
    layers, heads, dim = loaded.model.kv_shape()
    kv = KVStore(layers, heads, dim, mx.float32, block_size=16, state_bytes_per_row=per_row)
    row = RowCache(kv)
    row.reserve(10)
    assert kv.bytes_in_use == row.capacity * kv.bytes_per_token + 3 * per_row


def test_rows_leaving_and_joining_keep_their_state(hybrid):
    """Rows finish at different steps and new ones join a running batch (the group's batched
    state is then sliced, gathered and re-ordered): every row still gets what it gets alone."""
    _, loaded = hybrid
    prompts = [loaded.tokenizer.encode(t) for t in (TEXT, "Hello world!", TEXT[:40], "def add(a, b):", TEXT[7:30])]
    lengths = [5, 19, 9, 13, 7]
    params = [SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True) for n in lengths]
    alone = [generate(loaded, [p], q, block_size=16)[0][0] for p, q in zip(prompts, params)]
    with Engine(loaded, EngineConfig(block_size=16, max_running=3, max_batch_tokens=20)) as engine:
        streams = [engine.submit(Request(p, q)) for p, q in zip(prompts, params)]
        together = [[t for e in s for t in e.token_ids] for s in streams]
    assert together == alone


def test_state_gather_follows_every_row():
    """StateGather against the plain per-row answer: rows from one batch in order (read as
    is), a subset, rows out of order, rows from two batches, rows with their own state and
    fresh rows (zeros); afterwards every row belongs to the new batch."""
    from mlxserve.cache import StateBatch, StateGather

    rng = np.random.default_rng(0)

    def batch(n):
        b = StateBatch(n)
        b.layers[0] = (mx.array(rng.standard_normal((n, 3, 4)), dtype=mx.float32),
                       mx.array(rng.standard_normal((n, 2, 2, 2)), dtype=mx.float32))
        return b

    def zeros():
        return mx.zeros((3, 4)), mx.zeros((2, 2, 2))

    kv = KVStore(1, 1, 4, mx.float32)
    a, b = batch(4), batch(3)

    def row(source=None, index=0, own=None):
        r = RowCache(kv)
        if source is not None:
            r.state_batch, r.state_index = source, index
        elif own is not None:
            r.recurrent = {0: own}
        return r

    own = (mx.ones((3, 4)), mx.ones((2, 2, 2)))
    cases = [
        [row(a, i) for i in range(4)],
        [row(a, 1), row(a, 2)],
        [row(a, 3), row(a, 0), row(b, 1)],
        [row(b, 2), row(), row(a, 1), row(own=own), row(a, 2)],
    ]
    for rows in cases:
        expected = [r.recurrent.get(0) or zeros() for r in rows]
        read_as_is = rows[0].state_batch is a and len(rows) == 4
        gather = StateGather(rows)
        window, state = gather.gather(0, zeros)
        assert (gather.whole is not None) == read_as_is
        assert mx.array_equal(window, mx.stack([w for w, _ in expected]))
        assert mx.array_equal(state, mx.stack([s for _, s in expected]))
        assert all(r.state_batch is gather.target and r.state_index == i for i, r in enumerate(rows))


@pytest.mark.parametrize("quantize", [None, 8])
def test_fused_attention_projection_is_the_separate_one(quantize):
    """fuse() orders the gated attention's fused rows Q, K, V, gate and runs the Q/K norms and
    the partial RoPE as one pass (llama.RotaryNorm): queries, keys, values and gate are those
    of the separate projections, norms and RoPE calls."""
    import copy

    import mlx.nn as nn

    from mlxserve.random_weights import build_skeleton, random_weights, shape_config

    config = dict(shape_config("tiny-qwen3.5"), head_dim=32, hidden_size=64)
    model = build_skeleton(config)
    model.load_weights(list(random_weights(config, mx.float32, seed=3).items()))
    attention = next(layer.self_attn for layer in model.model.layers if not layer.is_linear)
    attention.q_norm.weight = mx.random.uniform(0.5, 1.5, (32,), key=mx.random.key(1))
    attention.k_norm.weight = mx.random.uniform(0.5, 1.5, (32,), key=mx.random.key(2))
    if quantize:
        nn.quantize(attention, group_size=32, bits=quantize)
    separate = copy.deepcopy(attention)
    attention.fuse()
    assert attention._rotary is not None and "qkvg_proj" in attention
    x = mx.random.normal((5, 64), key=mx.random.key(4))
    positions = mx.array([0, 3, 7, 100, 4095], dtype=mx.int32)
    for ours, theirs in zip(attention.project(x, positions), separate.project(x, positions)):
        assert ours.shape == theirs.shape
        np.testing.assert_allclose(np.array(ours), np.array(theirs), atol=1e-5, rtol=0)
