"""DFlash drafting (spec/dflash.py): the draft model against a numpy forward pass, the target's
captured hidden states against mlx-lm's layer outputs, the per-row context under accepted and
rejected drafts, the checkpoint loader, and output that never changes with speculation on.
"""

import json

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten
from mlx_lm.utils import load_model as mlx_lm_load_model

from mlxserve import scheduler as scheduler_module
from mlxserve.cli import main as cli_main
from mlxserve.engine import Engine, EngineConfig, make_scheduler
from mlxserve.loader import load_model
from mlxserve.sampling import SamplingParams
from mlxserve.scheduler import Request
from mlxserve.spec.dflash import (DFlashConfig, DFlashDraft, DFlashDrafter, default_target_layer_ids,
                                  load_dflash_draft, random_dflash_draft, resolve_drafts)

GREEDY = SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module", params=["qwen3", "qwen3_5"])
def target(request, tiny_model_dir):
    """A 4-layer tiny target (Qwen3, or Qwen3.5's 2 linear + 2 full layers) and its folder."""
    kw = {"num_layers": 4} if request.param == "qwen3" else {}
    folder = tiny_model_dir(request.param, "float32", **kw)
    return load_model(str(folder), progress=False), folder


def _draft_config(target_model, **kw) -> DFlashConfig:
    args = target_model.args
    base = dict(hidden_size=args.hidden_size, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                head_dim=16, intermediate_size=96, vocab_size=args.vocab_size, target_layer_ids=(0, 2),
                mask_token_id=args.vocab_size - 1, rope_theta=10000.0, layer_types=("full_attention",) * 2)
    base.update(kw)
    return DFlashConfig(**base)


def _random_draft(target_model, seed=3, **kw) -> DFlashDraft:
    draft = DFlashDraft(_draft_config(target_model, **kw))
    rng = np.random.default_rng(seed)
    params = [(name, mx.array(rng.normal(1.0 if name.endswith("norm.weight") else 0.0,
                                          0.1 if name.endswith("norm.weight") else 0.2, value.shape).astype(np.float32)))
              for name, value in tree_flatten(draft.parameters())]
    draft.load_weights(params)
    return draft.bind(target_model)


# ---- the draft model against numpy -----------------------------------------------------------
def _np(a) -> np.ndarray:
    return np.array(a.astype(mx.float32), dtype=np.float64)


def _rms(x, w, eps=1e-6):
    return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * w


def _rope(x, positions, theta):
    """Non-interleaved RoPE of x [n, heads, d] at positions [n]."""
    d = x.shape[-1]
    angles = np.asarray(positions, np.float64)[:, None] * theta ** (-np.arange(0, d, 2) / d)[None, :]
    cos, sin = np.cos(angles)[:, None, :], np.sin(angles)[:, None, :]
    x1, x2 = x[..., : d // 2], x[..., d // 2 :]
    return np.concatenate([x1 * cos - x2 * sin, x1 * sin + x2 * cos], axis=-1)


def numpy_block_logits(draft: DFlashDraft, embed: np.ndarray, head: np.ndarray, features: np.ndarray,
                       context_positions: list[int], anchor: int, position: int, k: int) -> np.ndarray:
    """The DFlash forward pass as the paper and z-lab's code define it, from scratch."""
    c = draft.config
    w = {name: _np(v) for name, v in tree_flatten(draft.parameters())}
    h_ctx = _rms(features @ w["fc.weight"].T, w["hidden_norm.weight"])
    x = embed[[anchor] + [c.mask_token_id] * k]
    n, q_pos = k + 1, np.arange(position, position + k + 1)
    groups = c.num_attention_heads // c.num_key_value_heads
    for i, kind in enumerate(c.layer_types):
        p = f"layers.{i}."

        def proj(v, name):
            return v @ w[p + f"self_attn.{name}.weight"].T

        xn = _rms(x, w[p + "input_layernorm.weight"])
        q = _rms(proj(xn, "q_proj").reshape(n, c.num_attention_heads, -1), w[p + "self_attn.q_norm.weight"])
        q = _rope(q, q_pos, c.rope_theta)
        keys, values = [], []
        for src, pos in ((h_ctx, context_positions), (xn, q_pos)):
            kk = _rms(proj(src, "k_proj").reshape(len(src), c.num_key_value_heads, -1), w[p + "self_attn.k_norm.weight"])
            keys.append(_rope(kk, pos, c.rope_theta))
            values.append(proj(src, "v_proj").reshape(len(src), c.num_key_value_heads, -1))
        keys, values = np.concatenate(keys), np.concatenate(values)
        key_pos = np.concatenate([np.asarray(context_positions, np.int64), q_pos])
        is_context = np.arange(len(key_pos)) < len(context_positions)
        out = np.zeros((n, c.num_attention_heads, c.head_dim))
        for head_i in range(c.num_attention_heads):
            kv = head_i // groups
            scores = q[:, head_i] @ keys[:, kv].T * c.head_dim**-0.5
            if kind == "sliding_attention":
                hidden = is_context[None, :] & (key_pos[None, :] <= q_pos[:, None] - c.sliding_window)
                scores = np.where(hidden, -np.inf, scores)
            scores = np.exp(scores - scores.max(-1, keepdims=True))
            out[:, head_i] = (scores / scores.sum(-1, keepdims=True)) @ values[:, kv]
        x = x + out.reshape(n, -1) @ w[p + "self_attn.o_proj.weight"].T
        xn = _rms(x, w[p + "post_attention_layernorm.weight"])
        gate, up = xn @ w[p + "mlp.gate_proj.weight"].T, xn @ w[p + "mlp.up_proj.weight"].T
        x = x + (gate / (1 + np.exp(-gate)) * up) @ w[p + "mlp.down_proj.weight"].T
    return _rms(x[1:], w["norm.weight"]) @ head.T


@pytest.mark.parametrize("layer_types,window", [(("full_attention",) * 2, None),
                                                (("sliding_attention", "full_attention"), 5)])
def test_draft_logits_match_a_numpy_forward_pass(target, layer_types, window):
    model = target[0].model
    draft = _random_draft(model, layer_types=layer_types, sliding_window=window)
    rng = np.random.default_rng(0)
    hidden = model.args.hidden_size
    features = rng.normal(0, 1, (11, 2 * hidden)).astype(np.float32)
    drafter = DFlashDrafter(draft)
    drafter.observe(0, mx.array(features[:4]))  # the context arrives in pieces, as steps feed it
    drafter.observe(4, mx.array(features[4:11]))
    tokens = list(range(10, 22))  # 12 tokens: the context is positions 0-10, the anchor at 11
    ours = np.array(drafter.logits(tokens, 4))
    embed = _np(model.model.embed_tokens.weight)
    head = embed if model.args.tie_word_embeddings else _np(model.lm_head.weight)
    # Four draft tokens come from the whole block the draft was made for: 15 mask tokens.
    ref = numpy_block_logits(draft, embed, head, features.astype(np.float64), list(range(11)), tokens[-1], 11, 15)
    np.testing.assert_allclose(ours, ref[:4], atol=1e-4, rtol=1e-4)
    short = numpy_block_logits(draft, embed, head, features.astype(np.float64), list(range(11)), tokens[-1], 11, 4)
    assert np.abs(short - ref[:4]).max() > 1e-2  # (a shorter block is another computation)
    if window:
        # The window hides part of the context: the same weights without it give other logits.
        full = DFlashDraft(_draft_config(model))
        full.load_weights(list(tree_flatten(draft.parameters())))
        unwindowed = numpy_block_logits(full.bind(model), embed, head, features.astype(np.float64), list(range(11)),
                                        tokens[-1], 11, 15)
        assert np.abs(unwindowed - ref).max() > 1e-2


@pytest.mark.parametrize("window", [None, 40])
def test_rows_drafted_together_get_their_own_drafts(target, window):
    """One forward pass for several rows (contexts of different lengths in buffers of one
    size, anchors at different positions) gives each row the logits it gets alone."""
    model = target[0].model
    kw = {"layer_types": ("sliding_attention", "full_attention"), "sliding_window": window} if window else {}
    draft = _random_draft(model, **kw)
    rng = np.random.default_rng(2)
    drafters, sequences = [], []
    for n in (200, 7, 0):  # (no context at all for the last)
        d = DFlashDrafter(draft)
        if n:
            d.observe(0, mx.array(rng.normal(0, 1, (n, 2 * model.args.hidden_size)).astype(np.float32)))
        drafters.append(d)
        sequences.append([int(t) for t in rng.integers(5, 60, n + 1)])
    alone = [np.array(d.logits(tokens, 15)) for d, tokens in zip(drafters, sequences)]
    together = draft.block_logits(drafters, [t[-1] for t in sequences], [len(t) - 1 for t in sequences], 15)
    with pytest.raises(ValueError, match="differ in capacity"):
        draft.block_logits([drafters[0], _grown(draft, 300, model)], [1, 1], [200, 300], 15)
    for i, logits in enumerate(alone):
        np.testing.assert_allclose(np.array(together[i]), logits, atol=1e-4, rtol=1e-4)
    pending = [d.propose(tokens, k) for d, tokens, k in zip(drafters, sequences, (15, 4, 9))]
    assert resolve_drafts(pending) == [a.argmax(-1)[:k].tolist() for a, k in zip(alone, (15, 4, 9))]
    # A row with a bigger buffer drafts in a forward pass of its own, in the same call.
    big = _grown(draft, 300, model)
    tokens = list(range(301))
    assert big.capacity > drafters[1].capacity
    big_alone = np.array(big.logits(tokens, 15)).argmax(-1).tolist()
    assert resolve_drafts([big.propose(tokens, 15), drafters[1].propose(sequences[1], 4)]) == \
        [big_alone, alone[1].argmax(-1)[:4].tolist()]


def _grown(draft, n, model):
    d = DFlashDrafter(draft)
    d.observe(0, mx.zeros((n, 2 * model.args.hidden_size)))
    d.logits(list(range(n + 1)), 1)
    return d


def test_the_context_forgets_replaced_and_rejected_positions(target):
    """Features observed again from an earlier position replace the old ones, and positions
    from the anchor on (a rejected draft's) are dropped: the logits are those of a drafter
    that only ever saw the right features."""
    model = target[0].model
    draft = _random_draft(model)
    rng = np.random.default_rng(1)
    good = rng.normal(0, 1, (9, 2 * model.args.hidden_size)).astype(np.float32)
    stale = rng.normal(0, 1, (6, 2 * model.args.hidden_size)).astype(np.float32)
    drafter = DFlashDrafter(draft)
    drafter.observe(0, mx.array(good[:5]))
    drafter.observe(5, mx.array(stale))  # positions 5-10: a verified draft, later partly rejected
    drafter.logits(list(range(30, 42)), 3)  # projected now, so the truncation below cuts the context
    drafter.observe(5, mx.array(good[5:9]))  # fed again (a hybrid row's accepted tokens)
    # ... and then a draft position beyond the committed ones: it must be ignored.
    drafter.observe(9, mx.array(stale[:3]))
    tokens = list(range(40, 50))  # anchor at 9: context 0-8
    fresh = DFlashDrafter(draft)
    fresh.observe(0, mx.array(good))
    np.testing.assert_allclose(np.array(drafter.logits(tokens, 3)), np.array(fresh.logits(tokens, 3)), atol=1e-5)
    assert drafter.positions == list(range(9))


# ---- the target's hidden states, and the context through real generation ---------------------
def mlx_lm_layer_outputs(folder, tokens: list[int], layer_ids) -> np.ndarray:
    """Outputs of the target's layers `layer_ids`, concatenated, from mlx-lm's model of the
    same checkpoint run over the whole sequence at once."""
    model, _ = mlx_lm_load_model(folder)
    inner = model.language_model.model if hasattr(model, "language_model") else model.model
    outputs = {}

    class Hook:
        def __init__(self, layer, i):
            self.layer, self.i = layer, i

        def __call__(self, *args, **kwargs):
            outputs[self.i] = out = self.layer(*args, **kwargs)
            return out

        def __getattr__(self, name):
            return getattr(self.layer, name)

    for i in layer_ids:
        inner.layers[i] = Hook(inner.layers[i], i)
    model(mx.array(tokens)[None])
    return np.concatenate([np.array(outputs[i][0]) for i in layer_ids], axis=-1)


class Oracle(DFlashDrafter):
    """Runs the real draft (its context bookkeeping and forward pass), then proposes the
    reference continuation instead, wrong at a position that cycles with the row's length:
    drafts accepted whole, cut short, and rejected whole."""

    def __init__(self, draft, reference, capacity_for=None):
        super().__init__(draft, capacity_for)
        self.reference = reference

    def propose(self, tokens, k):
        pending = super().propose(tokens, k)
        good = self.reference[len(tokens) : len(tokens) + k]
        wrong_at = len(tokens) % (k + 2)  # k + 1 or more: all right
        pending.override = [(t + 1) % 64 if i == wrong_at else t for i, t in enumerate(good)]
        return pending


def _run(loaded, config, prompts, draft=None):
    scheduler = make_scheduler(loaded, config)
    rows = []
    for i, prompt in enumerate(prompts):
        scheduler.add(Request(prompt, GREEDY, id=f"r{i}"))
        rows.append(scheduler.waiting[-1])
    out = {f"r{i}": [] for i in range(len(prompts))}
    while scheduler.has_work():
        for event in scheduler.step():
            out[event.request_id] += event.token_ids
    return out, rows, scheduler


@pytest.mark.parametrize("oracle", [False, True], ids=["random-draft", "oracle-draft"])
def test_speculating_rows_keep_the_context_of_their_committed_tokens(target, monkeypatch, oracle):
    """Three rows with chunked prompts under a small budget, drafting with a real draft model
    (random weights: almost always wrong), or with the right tokens wrong at one place: the
    output is what decoding without speculation gives, and each row's draft context at the
    end is the projection of mlx-lm's layer outputs for exactly its committed positions."""
    loaded, folder = target
    tok = loaded.tokenizer
    prompts = [tok.encode("The capital of France is"), tok.encode("def add(a, b):\n    return a + b\n" * 3),
               tok.encode("Numbers: 0 1 2 3 4 5")]
    base = dict(block_size=8, max_batch_tokens=16)
    plain, _, _ = _run(loaded, EngineConfig(**base), prompts)
    draft = _random_draft(loaded.model)
    import mlxserve.engine as engine_module

    monkeypatch.setattr(engine_module, "load_draft", lambda loaded, spec: draft)
    if oracle:
        references = [p + plain[f"r{i}"] for i, p in enumerate(prompts)]
        made = iter(references)
        monkeypatch.setattr(scheduler_module, "make_drafter", lambda name, d=None, capacity_for=None: Oracle(d, next(made), capacity_for))
    out, rows, scheduler = _run(loaded, EngineConfig(**base, speculative="dflash", draft_model="test", draft_tokens=3),
                                prompts)
    assert out == plain
    stats = scheduler.stats
    assert stats.drafted_tokens > 0
    if oracle:
        assert 0 < stats.accepted_tokens < stats.drafted_tokens
    # Prompt tokens count as prefill and generated ones (but each request's first) as
    # decoded, however often a hybrid row feeds accepted tokens again.
    assert stats.prefill_tokens == sum(map(len, prompts))
    assert stats.decode_tokens == len(prompts) * (GREEDY.max_tokens - 1)
    for row in rows:
        _assert_context_is_the_committed_positions(row.drafter, row.tokens, folder, draft)
        # Its buffers grow as its KV slot does: the budget's share for draft contexts covers them.
        assert row.drafter.capacity <= scheduler.kv.capacity_for(len(row.tokens))


def _assert_context_is_the_committed_positions(drafter, tokens, folder, draft):
    committed = len(tokens) - 1  # the last token was never fed
    drafter.logits(tokens, 1)  # brings the context up to date, as the next draft would
    assert drafter.positions == list(range(committed))
    features = mlx_lm_layer_outputs(folder, tokens[:committed], draft.target_layer_ids)
    for (k, v), (ek, ev) in zip(drafter.context, draft.project_context(mx.array(features), 0)):
        np.testing.assert_allclose(np.array(k), np.array(ek), atol=2e-4)
        np.testing.assert_allclose(np.array(v), np.array(ev), atol=2e-4)


def test_a_chats_next_turn_takes_over_the_draft_context_of_its_history(target, monkeypatch):
    """The second turn's history comes from the prefix cache, so the target never computes
    its hidden states again: the draft context of the first turn is taken over instead."""
    loaded, folder = target
    tok = loaded.tokenizer
    draft = _random_draft(loaded.model)
    import mlxserve.engine as engine_module

    monkeypatch.setattr(engine_module, "load_draft", lambda loaded, spec: draft)
    scheduler = make_scheduler(loaded, EngineConfig(block_size=8, speculative="dflash", draft_model="test"))
    first = tok.encode("Once upon a time there was a tiny model that generated text")
    scheduler.add(Request(first, GREEDY, id="turn-1"))
    answer = []
    while scheduler.has_work():
        answer += [t for e in scheduler.step() for t in e.token_ids]
    second = first + answer + tok.encode(" Hello world! How are you today?")
    scheduler.add(Request(second, GREEDY, id="turn-2"))
    row = scheduler.waiting[-1]
    while scheduler.has_work():
        scheduler.step()
    assert row.cached_tokens >= 16
    _assert_context_is_the_committed_positions(row.drafter, row.tokens, folder, draft)


def test_dflash_changes_no_output_through_the_engine(target):
    """End to end with a random draft at the default block (15 draft tokens: verifying steps
    larger than a compiled small step), several requests at once."""
    loaded, _ = target
    tok = loaded.tokenizer
    prompts = [tok.encode("Hello world! How are you"), tok.encode("Once upon a time there was")]
    with Engine(loaded, EngineConfig(block_size=8)) as engine:
        plain = [[t for e in engine.generate(p, GREEDY) for t in e.token_ids] for p in prompts]
    with Engine(loaded, EngineConfig(block_size=8, speculative="dflash", draft_model="random")) as engine:
        streams = [engine.submit(Request(p, GREEDY)) for p in prompts]
        spec = [[t for e in s for t in e.token_ids] for s in streams]
        assert engine.stats()["drafted_tokens"] > 0
    assert spec == plain


# ---- loading a checkpoint -----------------------------------------------------------------------
def _write_checkpoint(folder, draft: DFlashDraft, config: dict, prefix: str = "") -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config))
    weights = {prefix + k: v for k, v in tree_flatten(draft.parameters())}
    mx.save_safetensors(str(folder / "model.safetensors"), weights)


def _zlab_config(c: DFlashConfig) -> dict:
    return {"architectures": ["DFlashDraftModel"], "block_size": 8, "hidden_size": c.hidden_size,
            "num_hidden_layers": c.num_hidden_layers, "num_attention_heads": c.num_attention_heads,
            "num_key_value_heads": c.num_key_value_heads, "head_dim": c.head_dim,
            "intermediate_size": c.intermediate_size, "vocab_size": c.vocab_size, "rms_norm_eps": 1e-6,
            "rope_theta": c.rope_theta, "max_position_embeddings": 2048, "num_target_layers": 4,
            "layer_types": list(c.layer_types), "sliding_window": None,
            "dflash_config": {"mask_token_id": c.mask_token_id, "target_layer_ids": list(c.target_layer_ids)}}


@pytest.mark.parametrize("prefix", ["", "model."])
def test_a_zlab_checkpoint_loads_with_its_settings(target, tmp_path, prefix):
    model = target[0].model
    draft = _random_draft(model)
    _write_checkpoint(tmp_path / "d", draft, _zlab_config(draft.config), prefix)
    loaded = load_dflash_draft(tmp_path / "d", model, mx.float32)
    assert loaded.config.target_layer_ids == (0, 2) and loaded.block_size == 8
    assert loaded.config.mask_token_id == draft.config.mask_token_id
    for (name, a), (_, b) in zip(tree_flatten(loaded.parameters()), tree_flatten(draft.parameters())):
        assert mx.array_equal(a, b), name
    tokens = list(range(5, 12))
    a, b = DFlashDrafter(loaded), DFlashDrafter(draft)
    for d in (a, b):
        d.observe(0, mx.ones((6, 2 * model.args.hidden_size)))
    assert resolve_drafts([a.propose(tokens, 3)]) == resolve_drafts([b.propose(tokens, 3)])


@pytest.mark.parametrize("change,message", [
    (lambda c: c.pop("dflash_config"), "not a DFlash draft"),
    (lambda c: c.update(hidden_size=32), "hidden size 32"),
    (lambda c: c["dflash_config"].update(target_layer_ids=[0, 3]), "reads target layers"),
    (lambda c: c["dflash_config"].update(mask_token_id=10**6), "outside the target's vocabulary"),
    # (It was taken: a draft for another tokenizer borrowing this model's embedding and head.)
    (lambda c: c.update(vocab_size=2 * c["vocab_size"]), r"its vocabulary of \d+ tokens is not the target's \d+"),
    (lambda c: c.update(layer_types=["sliding_attention", "full_attention"]), "need a sliding_window"),
])
def test_a_draft_for_another_model_is_refused_with_the_reason(target, tmp_path, change, message):
    model = target[0].model
    draft = _random_draft(model)
    config = _zlab_config(draft.config)
    change(config)
    _write_checkpoint(tmp_path / "d", draft, config)
    with pytest.raises(ValueError, match=message):
        load_dflash_draft(tmp_path / "d", model, mx.float32)


def test_settings_in_the_newer_config_layout_are_read(target, tmp_path):
    """RoPE under rope_parameters (transformers 5) and the block under dflash_config."""
    model = target[0].model
    draft = _random_draft(model)
    config = _zlab_config(draft.config)
    del config["rope_theta"], config["block_size"]
    config["rope_parameters"] = {"rope_type": "default", "rope_theta": 10_000_000}
    config["dflash_config"]["block_size"] = 8
    _write_checkpoint(tmp_path / "d", draft, config)
    loaded = load_dflash_draft(tmp_path / "d", model, mx.float32)
    assert loaded.config.rope_theta == 10_000_000 and loaded.block_size == 8


@pytest.mark.parametrize("config,message", [
    ([1, 2], "not a JSON object"),
    ({"dflash_config": {"target_layer_ids": [], "mask_token_id": 5}}, "non-empty list"),
    ({"dflash_config": {"target_layer_ids": [0, "x"], "mask_token_id": 5}}, "non-empty list"),
    ({"dflash_config": {"target_layer_ids": [0], "mask_token_id": 5}, "hidden_size": 64, "num_hidden_layers": "2",
      "num_attention_heads": 4, "intermediate_size": 8, "vocab_size": 448}, "num_hidden_layers .* positive whole"),
    ({"dflash_config": {"target_layer_ids": [0], "mask_token_id": 5}}, "hidden_size .* positive whole"),
    ({"dflash_config": {"target_layer_ids": [0], "mask_token_id": 5, "block_size": 1}, "hidden_size": 64,
      "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 8, "vocab_size": 448},
     r"block_size in its config.json must be at least 2 \(a block is the newest token and the tokens drafted "
     r"after it: 1 leaves none to draft\), got 1"),
])
def test_a_malformed_draft_config_is_refused_with_the_reason(target, tmp_path, config, message):
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=message):
        load_dflash_draft(tmp_path, target[0].model, mx.float32)


@pytest.mark.parametrize("content", [b"", b"garbage"])
def test_an_unreadable_draft_weight_file_is_named(target, tmp_path, content):
    """MLX's "[read] Unable to read 1 bytes from file." named no file."""
    model = target[0].model
    draft = _random_draft(model)
    _write_checkpoint(tmp_path / "d", draft, _zlab_config(draft.config))
    weights = tmp_path / "d" / "model.safetensors"
    weights.write_bytes(content)
    with pytest.raises(ValueError) as err:
        load_dflash_draft(tmp_path / "d", model, mx.float32)
    assert str(err.value).startswith(f"DFlash draft: {weights}: not a readable safetensors file (")


def test_a_folder_without_a_draft_is_refused(target, tmp_path):
    with pytest.raises(ValueError, match="no config.json"):
        load_dflash_draft(tmp_path, target[0].model, mx.float32)


def test_the_cli_runs_a_draft_checkpoint_and_checks_its_flags(target, tmp_path, capsys):
    model, folder = target[0].model, target[1]
    draft = _random_draft(model)
    _write_checkpoint(tmp_path / "d", draft, _zlab_config(draft.config))
    args = ["run", "Hello world", "--model", str(folder), "--max-tokens", "12", "--seed", "0"]
    assert cli_main(args) == 0
    plain = capsys.readouterr().out
    assert cli_main(args + ["--speculative", "dflash", "--draft-model", str(tmp_path / "d")]) == 0
    assert capsys.readouterr().out == plain
    assert cli_main(args + ["--speculative", "dflash"]) != 0
    assert "needs --draft-model" in capsys.readouterr().err
    assert cli_main(args + ["--draft-model", str(tmp_path / "d")]) != 0
    assert "--draft-model needs --speculative dflash" in capsys.readouterr().err
    assert cli_main(args + ["--speculative", "dflash", "--draft-model", str(tmp_path / "nowhere")]) != 0
    err = capsys.readouterr().err
    assert "nowhere" in err and "Traceback" not in err


def test_the_kv_budget_leaves_room_for_the_draft_context(target, monkeypatch):
    loaded, _ = target
    import mlxserve.engine as engine_module

    draft = _random_draft(loaded.model)
    monkeypatch.setattr(engine_module, "load_draft", lambda loaded, spec: draft)
    budget = 64 * 2**20
    plain = make_scheduler(loaded, EngineConfig(memory_budget_bytes=budget)).kv
    spec = make_scheduler(loaded, EngineConfig(memory_budget_bytes=budget, speculative="dflash", draft_model="x")).kv
    layers, heads, dim = loaded.model.kv_shape()
    kv_bytes = layers * 2 * heads * dim * 4
    assert plain.max_bytes == budget
    assert spec.max_bytes == budget * kv_bytes // (kv_bytes + draft.context_bytes_per_token())


def test_a_drafts_block_sets_the_default_draft_tokens(target, monkeypatch):
    loaded, _ = target
    import mlxserve.engine as engine_module

    draft = _random_draft(loaded.model)  # block_size 16
    monkeypatch.setattr(engine_module, "load_draft", lambda loaded, spec: draft)
    assert make_scheduler(loaded, EngineConfig(speculative="dflash", draft_model="x")).draft_tokens == 15
    assert make_scheduler(loaded, EngineConfig(speculative="dflash", draft_model="x", draft_tokens=4)).draft_tokens == 4
    assert make_scheduler(loaded, EngineConfig(speculative="ngram")).draft_tokens == 3


def test_random_drafts_have_zlab_shapes():
    assert default_target_layer_ids(36, 5) == (1, 9, 17, 25, 33)
    assert default_target_layer_ids(28, 1) == (14,)


def test_a_random_draft_fits_its_target(target):
    model = target[0].model
    draft = random_dflash_draft(model, mx.float32)
    assert draft.config.hidden_size == model.args.hidden_size
    assert max(draft.target_layer_ids) < len(model.model.layers) - 1


def test_the_bench_runs_a_random_draft(tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert cli_main(["bench", "--random-weights", "tiny", "--dtype", "float32", "--concurrency", "1",
                     "--prompt-tokens", "16", "--gen-tokens", "8", "--runs", "1", "--warmup", "0",
                     "--speculative", "dflash", "--draft-model", "random", "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    assert data["config"]["engine"]["speculative"] == "dflash"
    stats = data["results"]["mlxserve"]["concurrency"][0]["engine_stats"]
    assert stats["drafted_tokens"] > 0
    shown = " ".join(capsys.readouterr().out.split())
    assert f"speculates (dflash): draft tokens accepted in the last run, C=1 {stats['accepted_tokens']} of " \
           f"{stats['drafted_tokens']}" in shown


def test_kept_contexts_hold_at_most_their_positions_oldest_out_first(target):
    from mlxserve.spec.dflash import DraftContexts

    model = target[0].model
    draft = _random_draft(model)
    width = 2 * model.args.hidden_size

    def finished(tokens):
        d = DFlashDrafter(draft)
        d.observe(0, mx.zeros((len(tokens) - 1, width)))
        return d

    kept = DraftContexts(max_positions=600)
    a, b, c = [1] * 9, [2] * 9, [3] * 9  # 8 positions each, in buffers of 256 entries
    for tokens in (a, b, c):
        kept.keep(tokens, finished(tokens), room=600)
    assert [t for t, _ in kept.entries.values()] == [b, c]  # 768 > 600 entries: the oldest went
    kept.keep(a, finished(a), room=300)  # running rows hold the rest: only the newest fits
    assert [t for t, _ in kept.entries.values()] == [a]
    fresh = DFlashDrafter(draft)
    assert kept.seed(fresh, a[:5] + [7, 7]) == 5 and fresh.positions == list(range(5))
    assert kept.seed(DFlashDrafter(draft), [9, 9, 9]) == 0


def test_the_warm_up_runs_a_draft_and_keeps_no_context(target, monkeypatch):
    loaded, _ = target
    import mlxserve.engine as engine_module

    draft = _random_draft(loaded.model)
    monkeypatch.setattr(engine_module, "load_draft", lambda loaded, spec: draft)
    drafted = []
    propose = DFlashDrafter.propose
    monkeypatch.setattr(DFlashDrafter, "propose", lambda self, tokens, k: drafted.append(k) or propose(self, tokens, k))
    # Blocks of 8 tokens: the warm-up's 2 + 2 + 15 tokens fill two, which the prefix cache
    # would keep (their memory is the requests').
    scheduler = make_scheduler(loaded, EngineConfig(speculative="dflash", draft_model="x", block_size=8))
    scheduler.warm_up()
    assert drafted[:1] == [15]  # a whole block first, as a single stream's drafts are
    assert not scheduler.draft_contexts.entries and scheduler.stats.drafted_tokens == 0
    assert scheduler.prefix.cached_blocks == 0 and scheduler.prefix.cached_bytes == 0


def test_memory_errors_name_the_budget_given_and_the_drafts_share(target, monkeypatch):
    loaded, _ = target
    import mlxserve.engine as engine_module
    from mlxserve.scheduler import PromptExceedsMemory, check_memory

    draft = _random_draft(loaded.model)
    monkeypatch.setattr(engine_module, "load_draft", lambda loaded, spec: draft)
    with pytest.raises(ValueError, match=r"KV cache's share of the 1.0 kB memory budget is .* DFlash draft's context"):
        make_scheduler(loaded, EngineConfig(memory_budget_bytes=1000, speculative="dflash", draft_model="x"))
    kv = make_scheduler(loaded, EngineConfig(memory_budget_bytes=2_000_000, speculative="dflash", draft_model="x")).kv
    with pytest.raises(PromptExceedsMemory, match=r"share of the 2.0 MB memory budget is 1\.\d MB \(the DFlash"):
        check_memory(2000, kv)


def test_draft_contexts_stay_within_their_share_of_memory_under_preemption(target, monkeypatch):
    """Waves of requests on a budget that forces preemption: after every step the draft
    contexts of running rows and kept ones hold at most the positions the share allows, a
    preempted row holds none, the output is what decoding without drafts gives, and every
    prompt token counts once as prefilled."""
    loaded, _ = target
    import mlxserve.engine as engine_module

    draft = _random_draft(loaded.model)
    monkeypatch.setattr(engine_module, "load_draft", lambda loaded, spec: draft)
    tok = loaded.tokenizer
    waves = [[tok.encode(f"{i} {text}") for i, text in enumerate(("The sky is blue", "def add(a, b):", "Hello"))],
             [tok.encode(f"{i} Once upon a time, {i}") for i in range(3)]]
    params = SamplingParams(max_tokens=30, temperature=0.0, ignore_eos=True)
    budget = 3 * _slot_bytes(loaded)

    def run(config):
        scheduler = make_scheduler(loaded, config)
        out, preempted_seen = {}, 0
        for w, wave in enumerate(waves):
            for i, prompt in enumerate(wave):
                scheduler.add(Request(prompt, params, id=f"{w}-{i}"))
            while scheduler.has_work():
                for event in scheduler.step():
                    out.setdefault(event.request_id, []).extend(event.token_ids)
                kept = scheduler.draft_contexts
                if kept is not None:
                    assert scheduler._draft_buffers() + kept._held <= kept.max_positions
                    assert all(row.drafter.capacity == 0 for row in scheduler.waiting if row.admitted)
                    preempted_seen += sum(1 for row in scheduler.waiting if row.admitted)
        return out, scheduler.stats, preempted_seen

    plain, _, _ = run(EngineConfig(block_size=8, memory_budget_bytes=budget))
    # The same KV memory, plus the draft contexts' share: the same rows fit, and are preempted.
    layers, heads, dim = loaded.model.kv_shape()
    kv_bytes = 2 * layers * heads * dim * 4
    shared = -(-budget * (kv_bytes + draft.context_bytes_per_token()) // kv_bytes)
    spec, stats, preempted_seen = run(EngineConfig(block_size=8, memory_budget_bytes=shared, speculative="dflash",
                                                   draft_model="x"))
    assert spec == plain
    assert stats.preemptions > 0 and preempted_seen > 0
    assert stats.prefill_tokens == sum(len(p) for wave in waves for p in wave)


def _slot_bytes(loaded) -> int:
    layers, heads, dim = loaded.model.kv_shape()
    return 64 * 2 * layers * heads * dim * 4
