"""Batched token sampling: per-row parameters, penalties, seeds and log-probabilities.

One `Sampler.sample` call per engine step turns the step's logits ``[n, V]`` into one token per
row. Every row carries its own `SamplingParams`, so greedy, nucleus and seeded rows share a batch.

Processing order, per row:

1. penalties on the raw logits (repetition, then frequency and presence);
2. ``logit_bias`` (OpenAI): each listed token's bias is added to its logit;
3. a constrained row's (grammar.py) disallowed tokens get -inf;
4. greedy rows (temperature 0) take the argmax here;
5. temperature;
6. top-k, then top-p (on the renormalised top-k distribution), then min-p;
7. one draw by the Gumbel-max trick: ``argmax(logits + Gumbel noise)`` is an exact sample of
   ``softmax(logits)`` and lets every row use its own random key in one batched op.

Penalty windows:

- ``repetition_penalty`` (HF / CTRL): every distinct token of the whole prompt and of all the
  generated tokens; a seen token's logit ``l`` becomes ``l / r`` if ``l > 0`` else ``l * r``.
- ``frequency_penalty`` and ``presence_penalty`` (OpenAI): generated tokens only;
  ``l -= frequency * count + presence * (count > 0)``.

Randomness: each row's ``t``-th generated token (``t`` = tokens recorded so far) is drawn with
the MLX key ``mx.random.key(h)``, where ``h`` is output ``t`` of a SplitMix64 stream started from
the row's seed. A token therefore depends only on (seed, t, its logits): not on the other rows of
the batch, its batch position, or what ran before; `RowSamplingState.rollback` rewinds ``t`` and
so replays the same draws. Unseeded rows get a random seed from a process-level generator when
their state is created and are then handled exactly like seeded rows.

Log-probabilities are taken from the raw model distribution, ``log_softmax(logits)`` before
penalties, logit bias, a grammar's mask and temperature, as OpenAI-compatible servers report them.
"""

from __future__ import annotations

import json
import math
import random
from dataclasses import dataclass
from functools import lru_cache
from typing import Sequence

import mlx.core as mx
import numpy as np

from .checks import MAX_TEMPERATURE, is_temperature

MAX_TOP_LOGPROBS = 20
MAX_STOP_STRINGS = 16
# The engine thread checks every stop string after each token for the text it must hold back
# (StopMatcher): a request's stop strings of a million characters would slow every stream.
MAX_STOP_LENGTH = 1000

# Temperatures below this count as greedy: the distribution is already a point mass for any
# practical logit gap, and dividing by a denormal temperature would overflow float32.
_GREEDY_TEMPERATURE = 1e-5

_MASK64 = (1 << 64) - 1
_GOLDEN64 = 0x9E3779B97F4A7C15

# Seeds for rows that do not ask for one.
_process_rng = random.Random()


@dataclass(frozen=True)
class SamplingParams:
    """How one request picks its tokens; shared by server, REPL and bench. Call `validate`."""

    max_tokens: int = 256
    temperature: float = 1.0  # below 1e-5 (in particular 0) => greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 => off
    min_p: float = 0.0
    repetition_penalty: float = 1.0  # over the distinct tokens of prompt + generated
    presence_penalty: float = 0.0  # over generated tokens
    frequency_penalty: float = 0.0  # over generated tokens
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    logprobs: bool = False
    top_logprobs: int = 0  # 0..20, needs logprobs
    # (token id, bias) pairs, each bias in [-100, 100] added to that token's logit (OpenAI's
    # logit_bias); ids beyond the model's logits are ignored.
    logit_bias: tuple[tuple[int, float], ...] = ()
    # Constrained decoding: a grammar (grammar.py; e.g. from OpenAI's response_format) that
    # the answer must follow, or None.
    grammar: str | None = None

    def validate(self) -> None:
        """Raise ``ValueError("<field>: <reason>")`` for the first out-of-range field."""

        def fail(field: str, reason: str) -> None:
            value = getattr(self, field)
            # As JSON writes it (a server's client sent JSON: ["a", "b"], true, null, not
            # Python's ['a', 'b'], True, None), which reads as well after a CLI flag. A float
            # as Python writes it: JSON's but for inf and nan, as a flag takes them.
            value = list(value) if isinstance(value, tuple) else value
            shown = repr(value) if isinstance(value, float) else json.dumps(value, ensure_ascii=False, default=repr)
            # (cut short: 300 stop strings or a 4000-digit number repeated back helps nobody)
            raise ValueError(f"{field}: {reason}, got {shown if len(shown) <= 80 else shown[:80] + '…'}")

        if not _is_int(self.max_tokens) or self.max_tokens < 1:
            fail("max_tokens", "must be an integer >= 1")
        if not is_temperature(self.temperature):
            fail("temperature", f"must be in [0, {MAX_TEMPERATURE}]")
        if not (0.0 < self.top_p <= 1.0):
            fail("top_p", "must be in (0, 1]")
        if not _is_int(self.top_k) or self.top_k < 0:
            fail("top_k", "must be an integer >= 0 (0 disables it)")
        if not (0.0 <= self.min_p <= 1.0):
            fail("min_p", "must be in [0, 1]")
        if not (0.0 < self.repetition_penalty < math.inf):
            fail("repetition_penalty", "must be a finite number > 0")
        if not (-2.0 <= self.presence_penalty <= 2.0):
            fail("presence_penalty", "must be in [-2, 2]")
        if not (-2.0 <= self.frequency_penalty <= 2.0):
            fail("frequency_penalty", "must be in [-2, 2]")
        if self.seed is not None and not _is_int(self.seed):
            fail("seed", "must be an integer or null")
        if len(self.stop) > MAX_STOP_STRINGS:
            fail("stop", f"at most {MAX_STOP_STRINGS} stop strings")
        if not all(isinstance(s, str) and s for s in self.stop):
            fail("stop", "stop strings must be non-empty strings")
        if any(len(s) > MAX_STOP_LENGTH for s in self.stop):
            fail("stop", f"a stop string may have at most {MAX_STOP_LENGTH:,} characters")
        if not all(_is_int(t) and t >= 0 for t in self.stop_token_ids):
            fail("stop_token_ids", "must be integers >= 0")
        if not _is_int(self.top_logprobs) or not (0 <= self.top_logprobs <= MAX_TOP_LOGPROBS):
            fail("top_logprobs", f"must be an integer in 0..{MAX_TOP_LOGPROBS}")
        if self.top_logprobs and not self.logprobs:
            fail("top_logprobs", "needs logprobs set to true")
        if not all(isinstance(pair, tuple) and len(pair) == 2 and _is_int(pair[0]) and pair[0] >= 0
                   and isinstance(pair[1], (int, float)) and -100.0 <= pair[1] <= 100.0
                   for pair in self.logit_bias):
            fail("logit_bias", "must be (token id >= 0, bias in [-100, 100]) pairs")
        if self.grammar is not None and not (isinstance(self.grammar, str) and self.grammar):
            fail("grammar", "must be a non-empty string (see grammar.py)")

    @property
    def is_greedy(self) -> bool:
        return self.temperature < _GREEDY_TEMPERATURE

    @property
    def has_penalties(self) -> bool:
        return (
            self.repetition_penalty != 1.0
            or self.presence_penalty != 0.0
            or self.frequency_penalty != 0.0
        )


@dataclass
class SampleResult:
    tokens: mx.array  # [n] int32
    logprobs: mx.array | None  # [n] float32: log-prob of the chosen token, raw distribution
    top_ids: mx.array | None  # [n, k] int32, k = max top_logprobs over rows, best first
    top_logprobs: mx.array | None  # [n, k] float32


class RowSamplingState:
    """Per-request sampling state kept by the scheduler: params, RNG, token history for penalties."""

    def __init__(self, params: SamplingParams, prompt_ids: Sequence[int], constraint=None):
        self.params = params
        # The row's grammar.Constraint (params.grammar), fed every committed token: the
        # sampler masks each draw to the tokens it allows next.
        self.constraint = constraint
        seed = params.seed if params.seed is not None else _process_rng.getrandbits(64)
        self._stream = _mix64(seed & _MASK64)
        # Only the distinct prompt ids matter, and only to the repetition penalty.
        if params.repetition_penalty != 1.0:
            self._prompt_ids = np.unique(np.asarray(prompt_ids, dtype=np.int32))
        else:
            self._prompt_ids = np.empty(0, dtype=np.int32)
        # Generated ids in a growable numpy buffer: turning it into an mx.array each step is a
        # memcpy, where a Python list would cost ~20 ns per element.
        self._generated = np.empty(64, dtype=np.int32)
        self._num_generated = 0

    @property
    def num_generated(self) -> int:
        """Tokens recorded so far; also the index of the next token within the request."""
        return self._num_generated

    def record(self, token_id: int) -> None:
        """Call after each emitted token."""
        self._append(token_id)
        if self.constraint is not None:
            self.constraint.consume(token_id)

    def _append(self, token_id: int) -> None:
        if self._num_generated == len(self._generated):
            self._generated = np.resize(self._generated, 2 * len(self._generated))
        self._generated[self._num_generated] = token_id
        self._num_generated += 1

    def record_pending(self) -> int:
        """Advance past a token that was sampled on the device but not read back yet (the
        engine pipelines steps); returns its index for `fill`. Only rows without penalties
        or a constraint are pipelined, so the placeholder never enters a penalty or a mask."""
        self._append(-1)
        return self._num_generated - 1

    def fill(self, index: int, token_id: int) -> None:
        """Replace the placeholder at `index` with the token once it is known."""
        self._generated[index] = token_id
        if self.constraint is not None:
            self.constraint.consume(token_id)

    def rollback(self, n: int) -> None:
        """Forget the last ``n`` recorded tokens; the next draws are the ones that followed them."""
        if not (0 <= n <= self._num_generated):
            raise ValueError(f"rollback: n must be in 0..{self._num_generated}, got {n}")
        self._num_generated -= n

    def generated_ids(self) -> np.ndarray:
        """The recorded tokens (a view: copy it to keep it past the next `record`)."""
        return self._generated[: self._num_generated]

    def _next_key(self) -> tuple[int, int]:
        """The two uint32 words of ``mx.random.key(h)`` for the next token (see module doc)."""
        return self._key_at(self._num_generated)

    def _key_at(self, t: int) -> tuple[int, int]:
        h = _mix64((self._stream + (t + 1) * _GOLDEN64) & _MASK64)
        return h >> 32, h & 0xFFFFFFFF

    def ahead(self, i: int) -> "SamplingAhead":
        """The sampling state of the token i places after the next one, for drawing it before
        the tokens between are recorded (verifying a speculative draft). Penalties depend on
        those tokens, so rows with penalties are not verified this way."""
        assert not self.params.has_penalties, "penalised rows do not speculate"
        return SamplingAhead(self, i)


class SamplingAhead:
    """A row's sampling state i tokens ahead (see RowSamplingState.ahead): the same
    parameters, and the random key that token t = num_generated + i would get, so a draft's
    verification draws exactly what decoding token by token would draw."""

    constraint = None  # (constrained rows do not speculate)

    def __init__(self, state: RowSamplingState, i: int):
        self.params = state.params
        self._prompt_ids = state._prompt_ids
        self._state, self._i = state, i

    def generated_ids(self) -> np.ndarray:
        return self._state.generated_ids()

    def _next_key(self) -> tuple[int, int]:
        return self._state._key_at(self._state.num_generated + self._i)


class Sampler:
    """Batched sampler. One call per engine step for all rows that emit a token."""

    def sample(self, logits: mx.array, rows: list[RowSamplingState]) -> SampleResult:
        """``logits`` is ``[n, V]`` in any float dtype; ``rows[i]`` belongs to ``logits[i]``.

        Returns unevaluated arrays. Log-probabilities are computed for every row as soon as one
        row asks for them; the caller reads the rows it needs.
        """
        if logits.ndim != 2 or logits.shape[0] != len(rows):
            raise ValueError(f"logits {logits.shape} do not match {len(rows)} rows")
        params = [r.params for r in rows]
        want_logprobs = any(p.logprobs for p in params)
        penalised = any(p.has_penalties for p in params)
        biased = any(p.logit_bias for p in params)
        constrained = any(r.constraint is not None for r in rows)
        if (not want_logprobs and not penalised and not biased and not constrained
                and all(p.is_greedy for p in params)):
            return SampleResult(mx.argmax(logits, axis=-1).astype(mx.int32), None, None, None)

        x = logits.astype(mx.float32)
        if penalised:
            x = _apply_penalties(x, rows)
        if biased:
            x = _apply_logit_bias(x, params)
        if constrained:
            x = mx.where(_allowed_tokens(rows, x.shape[1]), x, -mx.inf)

        sampled = [i for i, p in enumerate(params) if not p.is_greedy]
        if len(sampled) == len(rows):
            tokens = _draw(x, rows)
        else:
            tokens = mx.argmax(x, axis=-1)
            if sampled:
                idx = mx.array(sampled)
                tokens[idx] = _draw(x[idx], [rows[i] for i in sampled])
        tokens = tokens.astype(mx.int32)

        if not want_logprobs:
            return SampleResult(tokens, None, None, None)
        raw = logits.astype(mx.float32)
        logprobs = raw - mx.logsumexp(raw, axis=-1, keepdims=True)
        chosen = mx.take_along_axis(logprobs, tokens[:, None], axis=-1)[:, 0]
        k = min(max(p.top_logprobs for p in params), logprobs.shape[-1])
        if k == 0:
            return SampleResult(tokens, chosen, None, None)
        top_ids = mx.argpartition(-logprobs, kth=k - 1, axis=-1)[:, :k]
        top_vals = mx.take_along_axis(logprobs, top_ids, axis=-1)
        order = mx.argsort(-top_vals, axis=-1)
        top_ids = mx.take_along_axis(top_ids, order, axis=-1).astype(mx.int32)
        top_vals = mx.take_along_axis(top_vals, order, axis=-1)
        return SampleResult(tokens, chosen, top_ids, top_vals)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _mix64(z: int) -> int:
    """SplitMix64 finaliser: a bijective 64-bit mix."""
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)


def _column(values: list, dtype: mx.Dtype = mx.float32) -> mx.array:
    """Per-row parameters as an ``[n, 1]`` array that broadcasts against ``[n, V]``."""
    return mx.array(values, dtype=dtype)[:, None]


def _count_tokens(shape: tuple[int, int], ids: list[np.ndarray]) -> mx.array:
    """``[n, V]`` float32 counts of ``ids[i]`` in row ``i`` (one scatter-add for the batch)."""
    row_index = np.repeat(np.arange(len(ids), dtype=np.int32), [len(a) for a in ids])
    col_index = np.concatenate(ids)
    counts = mx.zeros(shape, dtype=mx.float32)
    if len(col_index) == 0:
        return counts
    return counts.at[mx.array(row_index), mx.array(col_index)].add(1.0)


def _apply_penalties(x: mx.array, rows: list[RowSamplingState]) -> mx.array:
    params = [r.params for r in rows]
    # Rows without penalties take part with neutral values (r = 1, penalties 0) and no history.
    none = np.empty(0, dtype=np.int32)
    counts = _count_tokens(x.shape, [r.generated_ids() if r.params.has_penalties else none for r in rows])
    if any(p.repetition_penalty != 1.0 for p in params):
        in_prompt = _count_tokens(x.shape, [r._prompt_ids for r in rows])
        seen = (counts + in_prompt) > 0
        r = _column([p.repetition_penalty for p in params])
        x = mx.where(seen, mx.where(x > 0, x / r, x * r), x)
    if any(p.frequency_penalty != 0.0 for p in params):
        x = x - _column([p.frequency_penalty for p in params]) * counts
    if any(p.presence_penalty != 0.0 for p in params):
        x = x - _column([p.presence_penalty for p in params]) * (counts > 0)
    return x


@lru_cache(maxsize=256)
def _bias_arrays(logit_bias: tuple[tuple[int, float], ...]) -> tuple[np.ndarray, np.ndarray]:
    """A row's logit_bias as (ids, biases) arrays, made once per distinct bias."""
    ids = np.fromiter((i for i, _ in logit_bias), dtype=np.int64, count=len(logit_bias))
    return ids, np.fromiter((b for _, b in logit_bias), dtype=np.float32, count=len(logit_bias))


def _apply_logit_bias(x: mx.array, params: list[SamplingParams]) -> mx.array:
    """Each row's biases added to its logits (one scatter-add for the batch)."""
    vocab = x.shape[-1]
    rows, cols, values = [], [], []
    for i, p in enumerate(params):
        if p.logit_bias:
            ids, biases = _bias_arrays(p.logit_bias)
            inside = ids < vocab  # a tokenizer may count ids the model has no logits for
            rows.append(np.full(int(inside.sum()), i, dtype=np.int32))
            cols.append(ids[inside].astype(np.int32))
            values.append(biases[inside])
    cols = np.concatenate(cols)
    if len(cols) == 0:
        return x
    bias = mx.zeros(x.shape, dtype=mx.float32)
    bias = bias.at[mx.array(np.concatenate(rows)), mx.array(cols)].add(
        mx.array(np.concatenate(values)))
    return x + bias


def _allowed_tokens(rows: list[RowSamplingState], vocab: int) -> mx.array:
    """[n, vocab] bool: the tokens each row's constraint allows next (every token for a row
    without one). Token ids past a constraint's vocabulary (a model's padded logits) are never
    allowed to a constrained row."""
    words = max(r.constraint.mask_words for r in rows if r.constraint is not None)
    masks = np.full((len(rows), max(words, (vocab + 31) // 32)), -1, dtype=np.int32)
    for i, row in enumerate(rows):
        if row.constraint is not None:
            masks[i] = 0
            row.constraint.fill_mask(masks[i, : row.constraint.mask_words])
    bits = (mx.array(masks.view(np.uint32))[:, :, None] >> mx.arange(32, dtype=mx.uint32)) & 1
    return bits.reshape(len(rows), -1)[:, :vocab].astype(mx.bool_)


def _draw(x: mx.array, rows: list[RowSamplingState]) -> mx.array:
    """One token per row from penalised float32 logits ``x`` ``[m, V]`` of non-greedy rows."""
    params = [r.params for r in rows]
    vocab = x.shape[-1]
    if any(p.temperature != 1.0 for p in params):
        x = x / _column([p.temperature for p in params])
    top_k = [p.top_k if p.top_k < vocab else 0 for p in params]
    if any(p.top_p < 1.0 for p in params):
        x = _top_k_top_p(x, top_k, [p.top_p for p in params])
    elif any(top_k):
        x = _top_k(x, top_k)
    if any(p.min_p > 0.0 for p in params):
        # p >= min_p * p_max  <=>  logit >= max_logit + log(min_p), at any normalisation.
        log_min_p = _column([math.log(p.min_p) if p.min_p > 0 else -math.inf for p in params])
        x = mx.where(x < x.max(axis=-1, keepdims=True) + log_min_p, -math.inf, x)
    keys = mx.array([r._next_key() for r in rows], dtype=mx.uint32)
    noise = mx.vmap(lambda key: mx.random.gumbel((vocab,), key=key))(keys)
    return mx.argmax(x + noise, axis=-1)


def _top_k(x: mx.array, top_k: list[int]) -> mx.array:
    """Keep logits >= each row's k-th largest (ties at the boundary are kept); k = 0 => off.

    No full sort: partition out the largest max(k) and sort only those.
    """
    vocab = x.shape[-1]
    k_max = max(top_k)
    largest = mx.sort(mx.partition(x, kth=vocab - k_max, axis=-1)[:, vocab - k_max :], axis=-1)
    k = _column(top_k, mx.int32)
    kth_largest = mx.take_along_axis(largest, mx.where(k > 0, k_max - k, 0), axis=-1)
    threshold = mx.where(k > 0, kth_largest, -math.inf)
    return mx.where(x < threshold, -math.inf, x)


def _top_k_top_p(x: mx.array, top_k: list[int], top_p: list[float]) -> mx.array:
    """Top-k, then top-p on the renormalised survivors, from one descending sort.

    Top-p keeps the smallest prefix of the sorted tokens whose probability reaches p: a token
    stays while the mass strictly before it is < p. Ties at the boundary are kept.
    """
    vocab = x.shape[-1]
    ranked = -mx.sort(-x, axis=-1)
    k = _column(top_k, mx.int32)
    ranked = mx.where((k > 0) & (mx.arange(vocab) >= k), -math.inf, ranked)
    mass_before = mx.cumsum(mx.softmax(ranked, axis=-1), axis=-1, inclusive=False)
    p = _column(top_p)
    # p = 1 keeps everything explicitly: rounding can push the mass before the tail above 1.
    keep = (ranked > -math.inf) & ((mass_before < p) | (p >= 1.0))
    # At least the first token: a p below float32's range (1e-50) is 0 here, and keeping
    # none would make the threshold the last (smallest) entry: the whole vocabulary.
    num_kept = mx.maximum(keep.sum(axis=-1, keepdims=True), 1)
    threshold = mx.take_along_axis(ranked, num_kept - 1, axis=-1)
    return mx.where(x < threshold, -math.inf, x)
