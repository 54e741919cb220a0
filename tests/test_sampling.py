import math

import mlx.core as mx
import numpy as np
import pytest

from mlxserve.sampling import RowSamplingState, SampleResult, Sampler, SamplingParams
from mlxserve.sampling import _apply_penalties

sampler = Sampler()

# A distribution with known boundaries: cumulative mass 0.5, 0.8, 0.95, 1.0.
PROBS = [0.5, 0.3, 0.15, 0.05]
LOGITS = [math.log(p) for p in PROBS]


def state(prompt=(), **kw) -> RowSamplingState:
    return RowSamplingState(SamplingParams(**kw), prompt)


def draws(logits, n=2000, **kw) -> set[int]:
    """Tokens drawn by n rows with distinct seeds from the same logits, in one call."""
    rows = [state(seed=i, **kw) for i in range(n)]
    out = sampler.sample(mx.array([logits] * n), rows)
    return set(np.array(out.tokens).tolist())


def generate(rows, logits, steps):
    """Sample `steps` tokens for every row, recording each one; returns [rows, steps]."""
    out = []
    for _ in range(steps):
        tokens = np.array(sampler.sample(logits, rows).tokens).tolist()
        for row, t in zip(rows, tokens):
            row.record(t)
        out.append(tokens)
    return np.array(out).T.tolist()


def log_softmax(x):
    x = np.asarray(x, dtype=np.float64)
    return x - x.max(-1, keepdims=True) - np.log(np.exp(x - x.max(-1, keepdims=True)).sum(-1, keepdims=True))


# --- greedy -------------------------------------------------------------------------------


def test_greedy_fast_path_is_argmax_int32():
    logits = mx.random.normal((5, 97)).astype(mx.bfloat16)
    out = sampler.sample(logits, [state(temperature=0.0) for _ in range(5)])
    assert out.tokens.dtype == mx.int32
    assert out.logprobs is None and out.top_ids is None and out.top_logprobs is None
    assert np.array(out.tokens).tolist() == np.array(mx.argmax(logits, -1)).tolist()


@pytest.mark.parametrize("temperature", [0.0, 1e-6])
def test_tiny_temperature_is_greedy(temperature):
    logits = mx.random.normal((4, 50), key=mx.random.key(1))
    rows = [state(temperature=temperature, logprobs=True, seed=i) for i in range(4)]
    out = sampler.sample(logits, rows)  # logprobs=True forces the general path
    assert np.array(out.tokens).tolist() == np.array(mx.argmax(logits, -1)).tolist()


def test_low_temperature_concentrates_on_argmax():
    assert draws([0.0, 1.0, 0.5], temperature=0.05) == {1}


# --- truncation ---------------------------------------------------------------------------


def test_top_k_never_leaves_top_k():
    logits = [0.1, 2.0, -1.0, 1.9, 0.0, 1.0, 0.5, -3.0]
    assert draws(logits, top_k=2) == {1, 3}
    assert draws(logits, top_k=3) == {1, 3, 5}


@pytest.mark.parametrize("top_p, kept", [(0.45, {0}), (0.75, {0, 1}), (0.85, {0, 1, 2}), (1.0, {0, 1, 2, 3})])
def test_top_p_keeps_smallest_set_reaching_p(top_p, kept):
    assert draws(LOGITS, n=3000, top_p=top_p) == kept


def test_a_top_p_too_small_for_float32_keeps_the_top_token():
    assert draws(LOGITS, n=300, top_p=1e-50, temperature=5.0) == {0}  # (1e-50 is 0 in float32)


def test_top_p_applies_to_the_renormalised_top_k():
    # After top-k=2 the mass is 0.625 / 0.375: p=0.6 keeps only token 0 (on the original
    # distribution the mass before token 1 would be 0.5 < 0.6, keeping it).
    assert draws(LOGITS, top_k=2, top_p=0.6) == {0}
    assert draws(LOGITS, top_k=2, top_p=0.7) == {0, 1}


def test_min_p_drops_tokens_below_fraction_of_max():
    # p_max = 0.5: min_p = 0.2 => keep p >= 0.1 (0.5, 0.3, 0.15), drop 0.05.
    assert draws(LOGITS, n=3000, min_p=0.2) == {0, 1, 2}
    assert draws(LOGITS, min_p=0.7) == {0}


def test_temperature_is_applied_before_top_p():
    # At temperature 0.5 the probabilities become ~[0.70, 0.25, 0.06, 0.007]: top_p=0.9 keeps {0, 1}
    # (at temperature 1 it would keep {0, 1, 2}).
    assert draws(LOGITS, temperature=0.5, top_p=0.9) == {0, 1}


def test_sampling_follows_the_distribution():
    rows = [state(seed=i) for i in range(4000)]
    counts = np.bincount(np.array(sampler.sample(mx.array([LOGITS] * 4000), rows).tokens), minlength=4)
    assert np.allclose(counts / 4000, PROBS, atol=0.03)


# --- penalties ----------------------------------------------------------------------------


def greedy_pick(logits, row) -> int:
    return int(sampler.sample(mx.array([logits]), [row]).tokens[0])


@pytest.mark.parametrize("penalty, expected", [(1.6, 0), (1.7, 1)])
def test_repetition_penalty_divides_positive_logits(penalty, expected):
    # 2.0 / 1.6 = 1.25 > 1.2 but 2.0 / 1.7 = 1.18 < 1.2
    row = state(prompt=[0, 0, 3], temperature=0, repetition_penalty=penalty)
    assert greedy_pick([2.0, 1.2, -5.0, -5.0], row) == expected


@pytest.mark.parametrize("penalty, expected", [(1.4, 0), (1.6, 1)])
def test_repetition_penalty_multiplies_negative_logits(penalty, expected):
    # -1.0 * 1.4 = -1.4 > -1.5 but -1.0 * 1.6 = -1.6 < -1.5
    row = state(prompt=[0], temperature=0, repetition_penalty=penalty)
    assert greedy_pick([-1.0, -1.5, -9.0], row) == expected


def test_repetition_penalty_covers_generated_tokens():
    row = state(temperature=0, repetition_penalty=1.7)
    assert greedy_pick([2.0, 1.2], row) == 0
    row.record(0)
    assert greedy_pick([2.0, 1.2], row) == 1


@pytest.mark.parametrize("penalty, expected", [(0.4, 0), (0.6, 1)])
def test_frequency_penalty_scales_with_count(penalty, expected):
    # token 0 generated twice: 2.0 - 2 * 0.4 = 1.2 > 1.0, 2.0 - 2 * 0.6 = 0.8 < 1.0
    row = state(prompt=[0] * 10, temperature=0, frequency_penalty=penalty)
    row.record(0), row.record(0)
    assert greedy_pick([2.0, 1.0], row) == expected


@pytest.mark.parametrize("penalty, expected", [(0.9, 0), (1.1, 1)])
def test_presence_penalty_is_once_per_token(penalty, expected):
    # token 0 generated three times: 2.0 - 0.9 = 1.1 > 1.0, 2.0 - 1.1 = 0.9 < 1.0
    row = state(prompt=[0] * 10, temperature=0, presence_penalty=penalty)
    for _ in range(3):
        row.record(0)
    assert greedy_pick([2.0, 1.0], row) == expected


def test_penalties_match_formulas_in_a_mixed_batch():
    logits = np.array([[1.0, -2.0, 3.0, 0.5, -0.5]] * 3, dtype=np.float32)
    rows = [
        state(prompt=[1, 1, 4], repetition_penalty=2.0, frequency_penalty=0.5, presence_penalty=0.25),
        state(prompt=[0, 1, 2]),  # no penalties: unchanged
        state(prompt=[3], presence_penalty=-1.0),
    ]
    for t in (2, 2, 0):
        rows[0].record(t)
        rows[1].record(t)
    rows[2].record(1)
    out = np.array(_apply_penalties(mx.array(logits), rows))
    expected = logits.copy()
    # row 0: seen = {0, 1, 2, 4}; counts: token 2 twice, token 0 once
    expected[0] = [1.0 / 2, -2.0 * 2, 3.0 / 2, 0.5, -0.5 * 2]
    expected[0] -= 0.5 * np.array([1, 0, 2, 0, 0]) + 0.25 * np.array([1, 0, 1, 0, 0])
    expected[2] += np.array([0, 1.0, 0, 0, 0])
    np.testing.assert_allclose(out, expected, rtol=1e-6)


# --- logit bias ---------------------------------------------------------------------------


@pytest.mark.parametrize("bias, expected", [(0.7, 0), (0.9, 1)])
def test_logit_bias_is_added_to_the_logit_of_greedy_rows_too(bias, expected):
    # 1.2 + 0.7 = 1.9 < 2.0 but 1.2 + 0.9 = 2.1 > 2.0; temperature 0 is no way around the bias
    assert greedy_pick([2.0, 1.2, -5.0], state(temperature=0, logit_bias=((1, bias),))) == expected


def test_logit_bias_of_minus_100_bans_and_100_forces_a_token_per_row():
    banned = ((0, -100.0), (1, -100.0), (3, -100.0))
    assert draws(LOGITS, logit_bias=banned) == {2}
    assert draws(LOGITS, n=500, temperature=1.5, logit_bias=((3, 100.0),)) == {3}
    logits = mx.array([[2.0, 1.0, 0.5, 0.0]] * 4)
    rows = [state(temperature=0, logit_bias=((2, 100.0),)), state(temperature=0),
            state(seed=1, logit_bias=banned), state(seed=2, logit_bias=((9999, 50.0),))]  # an id past the logits
    assert np.array(sampler.sample(logits, rows).tokens).tolist()[:3] == [2, 0, 2]


def test_logit_bias_applies_to_speculative_positions():
    """A draft's positions are drawn through RowSamplingState.ahead: the same params, the bias with them."""
    row = state(temperature=0, logit_bias=((1, 5.0),))
    out = sampler.sample(mx.array([[2.0, 1.0, 0.0]] * 3), [row, row.ahead(1), row.ahead(2)])
    assert np.array(out.tokens).tolist() == [1, 1, 1]


def test_logprobs_stay_those_of_the_raw_distribution_under_a_bias():
    logits = np.array([[0.5, 1.5, -1.0]], dtype=np.float32)
    out = sampler.sample(mx.array(logits), [state(temperature=0, logprobs=True, logit_bias=((2, 10.0),))])
    assert int(out.tokens[0]) == 2
    np.testing.assert_allclose(float(out.logprobs[0]), log_softmax(logits)[0, 2], atol=1e-5)


# --- seeds and rollback --------------------------------------------------------------------

FLAT = mx.zeros((1, 1000))


def test_same_seed_same_sequence():
    a = generate([state(seed=42)], FLAT, 20)
    b = generate([state(seed=42)], FLAT, 20)
    assert a == b


def test_seeded_tokens_independent_of_batch_and_position():
    alone = generate([state(seed=7, top_p=0.9)], FLAT, 10)[0]
    rows = [state(), state(seed=3), state(seed=7, top_p=0.9), state(temperature=0)]
    logits = mx.concatenate([mx.random.normal((1, 1000)), FLAT, FLAT, FLAT])
    assert generate(rows, logits, 10)[2] == alone


def test_different_seeds_differ():
    a, b = generate([state(seed=1), state(seed=2)], mx.zeros((2, 1000)), 10)
    assert a != b


def test_unseeded_rows_get_distinct_streams():
    a, b = generate([state(), state()], mx.zeros((2, 1000)), 10)
    assert a != b


@pytest.mark.parametrize("seed", [5, None])
def test_rollback_replays_the_same_draws(seed):
    # the frequency penalty makes every draw depend on the recorded history as well
    row = state(seed=seed, frequency_penalty=2.0, top_k=20)
    logits = mx.random.normal((1, 64), key=mx.random.key(0)) * 0.3
    first = generate([row], logits, 12)[0]
    row.rollback(5)
    assert row.num_generated == 7
    assert generate([row], logits, 5)[0] == first[7:]
    with pytest.raises(ValueError):
        row.rollback(13)


# --- logprobs -----------------------------------------------------------------------------


def test_logprobs_are_raw_log_softmax():
    logits = np.random.default_rng(0).normal(size=(3, 40)).astype(np.float32)
    rows = [
        state(prompt=range(20), temperature=0.7, repetition_penalty=1.3, logprobs=True, seed=1),
        state(temperature=0, logprobs=True),
        state(top_p=0.5, seed=2),
    ]
    out = sampler.sample(mx.array(logits), rows)
    expected = log_softmax(logits)
    tokens = np.array(out.tokens)
    np.testing.assert_allclose(np.array(out.logprobs), expected[np.arange(3), tokens], atol=1e-5)
    assert out.top_ids is None


def test_top_logprobs_sorted_and_correct():
    logits = np.random.default_rng(1).normal(size=(2, 100)).astype(np.float32)
    rows = [state(logprobs=True, top_logprobs=5, seed=0), state(logprobs=True, top_logprobs=2, temperature=0)]
    out = sampler.sample(mx.array(logits).astype(mx.float16), rows)
    assert out.top_ids.shape == (2, 5) and out.top_ids.dtype == mx.int32
    expected = log_softmax(np.array(mx.array(logits).astype(mx.float16).astype(mx.float32)))
    top_ids, top_lp = np.array(out.top_ids), np.array(out.top_logprobs)
    for i in range(2):
        assert top_ids[i].tolist() == np.argsort(-expected[i])[:5].tolist()
        np.testing.assert_allclose(top_lp[i], expected[i][top_ids[i]], atol=1e-5)
        assert np.all(np.diff(top_lp[i]) <= 0)


# --- mixed batch --------------------------------------------------------------------------


def test_mixed_batch_in_one_call():
    rng = np.random.default_rng(2)
    logits = rng.normal(size=(5, 30)).astype(np.float32)
    rows = [
        state(temperature=0),
        state(temperature=0.8, top_p=0.9, top_k=5),
        state(seed=11, min_p=0.1),
        state(prompt=[int(np.argmax(logits[3]))], temperature=0, repetition_penalty=100.0),
        state(seed=12, logprobs=True, top_logprobs=3),
    ]
    out = sampler.sample(mx.array(logits), rows)
    assert isinstance(out, SampleResult)
    tokens = np.array(out.tokens).tolist()
    assert tokens[0] == int(np.argmax(logits[0]))
    assert tokens[1] in np.argsort(-logits[1])[:5]
    assert tokens[2] == int(sampler.sample(mx.array(logits[2:3]), [state(seed=11, min_p=0.1)]).tokens[0])
    assert tokens[3] == int(np.argsort(-logits[3])[1])  # the penalised argmax lost its place
    assert tokens[4] == int(sampler.sample(mx.array(logits[4:5]), [state(seed=12)]).tokens[0])
    assert out.top_ids.shape == (5, 3)


# --- validation ---------------------------------------------------------------------------


def test_defaults_are_valid():
    SamplingParams().validate()
    SamplingParams(temperature=2).validate()
    SamplingParams(temperature=0, top_p=0.01, top_k=1, min_p=1.0, presence_penalty=-2,
                   frequency_penalty=2, seed=-3, stop=("x",) * 15 + ("y" * 1000,), logprobs=True, top_logprobs=20,
                   logit_bias=((0, -100), (5, 100.0))).validate()


@pytest.mark.parametrize("field, value", [
    ("max_tokens", 0),
    ("max_tokens", 1.5),
    ("temperature", -0.1),
    ("temperature", math.inf),
    ("temperature", 2.01),  # OpenAI's limit, everywhere (checks.MAX_TEMPERATURE)
    ("top_p", 0.0),
    ("top_p", 1.01),
    ("top_p", math.nan),
    ("top_k", -1),
    ("min_p", -0.01),
    ("min_p", 1.5),
    ("repetition_penalty", 0.0),
    ("repetition_penalty", -1.0),
    ("presence_penalty", 2.5),
    ("frequency_penalty", -2.01),
    ("seed", 1.0),
    ("stop", ("s",) * 17),
    ("stop", ("",)),
    ("stop", ("x", "y" * 1001)),  # (each is checked after every token, for every stream: sampling.MAX_STOP_LENGTH)
    ("stop_token_ids", (-1,)),
    ("top_logprobs", 21),
    ("top_logprobs", -1),
    ("logit_bias", ((1, 100.5),)),
    ("logit_bias", ((1, math.nan),)),
    ("logit_bias", ((-1, 1.0),)),
    ("logit_bias", ((1.0, 1.0),)),
    ("logit_bias", ((1,),)),
])
def test_validate_rejects_with_field_name(field, value):
    extra = {"logprobs": True} if field == "top_logprobs" else {}
    with pytest.raises(ValueError, match=f"^{field}: "):
        SamplingParams(**{field: value}, **extra).validate()


def test_top_logprobs_needs_logprobs():
    with pytest.raises(ValueError, match="^top_logprobs: needs logprobs set to true, got 3$"):
        SamplingParams(top_logprobs=3).validate()


def test_a_rejected_value_is_shown_as_json_writes_it():
    """The server's client wrote JSON, and a CLI flag's value reads as well so: ["a", ""],
    not Python's ['a', '']; a float as a flag takes it (inf)."""
    for params, says in [(SamplingParams(stop=("a", "")), 'got ["a", ""]'),
                         (SamplingParams(logit_bias=((1, 100.5),)), "got [[1, 100.5]]"),
                         (SamplingParams(top_p=math.inf), "got inf")]:
        with pytest.raises(ValueError) as err:
            params.validate()
        assert str(err.value).endswith(says), err.value
