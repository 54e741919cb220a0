"""Speculative decoding: the n-gram drafter, and rows that verify drafts in the scheduler.

Whatever a drafter proposes, the output must be what decoding token by token gives: the same
greedy ids, the same seeded samples, the same log-probs. Scripted drafters (right, wrong at a
chosen place, always wrong) drive every path: a draft accepted whole, cut short (K/V trimmed;
a hybrid row's recurrent state restored and its accepted tokens fed again), rejected whole.
"""

import pytest

from mlxserve import scheduler as scheduler_module
from mlxserve.engine import Engine, EngineConfig, make_scheduler
from mlxserve.loader import load_model
from mlxserve.sampling import SamplingParams
from mlxserve.scheduler import Request
from mlxserve.spec import NgramDrafter

GREEDY = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
SAMPLED = SamplingParams(max_tokens=24, temperature=1.0, top_p=0.9, seed=11, ignore_eos=True,
                         logprobs=True, top_logprobs=2)


# ---- the n-gram drafter --------------------------------------------------------------------
def test_ngram_proposes_what_followed_the_latest_match():
    d = NgramDrafter(min_n=2, max_n=3)
    assert d.propose([1, 2, 3, 4, 9, 1, 2, 3, 5, 1, 2], 2) == [3, 5]  # the latest (1, 2)
    assert d.propose([1, 2, 3, 4, 9, 1, 2, 3, 5, 1, 2, 3], 2) == [5, 1]  # (1, 2, 3) again, latest
    assert NgramDrafter().propose([1, 2, 3, 4], 3) == []  # nothing repeats
    assert NgramDrafter().propose([7, 8, 7, 8], 0) == []


def test_ngram_prefers_the_longest_match():
    # (4, 2) last occurred before 6; (9, 4, 2) occurred before 5.
    tokens = [9, 4, 2, 5, 0, 4, 2, 6, 0, 9, 4, 2]
    assert NgramDrafter(min_n=2, max_n=3).propose(tokens, 1) == [5]
    assert NgramDrafter(min_n=2, max_n=2).propose(tokens, 1) == [6]


def test_ngram_draft_continues_a_loop_past_the_end():
    assert NgramDrafter().propose([5, 5, 5], 4) == [5, 5, 5, 5]
    assert NgramDrafter().propose([7, 8, 9, 7, 8], 5) == [9, 7, 8, 9, 7]


def test_ngram_index_grown_step_by_step_matches_a_fresh_one():
    tokens = [3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5, 8, 9, 7, 9, 3, 2, 3, 8, 4, 6, 2, 6, 4, 3, 3, 8, 3, 2, 7, 9, 5]
    grown = NgramDrafter(min_n=1, max_n=3)
    for end in range(1, len(tokens) + 1):
        assert grown.propose(tokens[:end], 3) == NgramDrafter(min_n=1, max_n=3).propose(tokens[:end], 3)


def test_ngram_sizes_are_checked():
    with pytest.raises(ValueError, match="min_n"):
        NgramDrafter(min_n=3, max_n=2)


# ---- rows verifying drafts --------------------------------------------------------------------
class Scripted:
    """Proposes the continuation of whichever reference sequence the row's tokens begin,
    altered at draft position `wrong_at` (None: never; -1: every position)."""

    def __init__(self, references: list[list[int]], wrong_at: int | None):
        self.references, self.wrong_at = references, wrong_at

    def propose(self, tokens: list[int], k: int) -> list[int]:
        reference = next((r for r in self.references if r[: len(tokens)] == tokens), [])
        draft = list(reference[len(tokens) : len(tokens) + k])
        for i in range(len(draft)):
            if self.wrong_at == -1 or i == self.wrong_at:
                draft[i] = (draft[i] + 1) % 64
        return draft


def _script(monkeypatch, references, wrong_at):
    monkeypatch.setattr(scheduler_module, "make_drafter", lambda name, draft=None, capacity_for=None: Scripted(references, wrong_at))


@pytest.fixture(scope="module", params=["qwen3", "qwen3_5"])
def loaded(request, tiny_model_dir):
    return load_model(str(tiny_model_dir(request.param, "float32")), progress=False)


def _prompts(tokenizer):
    return [tokenizer.encode(t) for t in ("Hello", "one two three one two three one", "a b c d e f g a b c")]


def _events(engine, prompt, params):
    return list(engine.submit(Request(prompt, params)))


def _tokens(events):
    return [t for e in events for t in e.token_ids]


def _assert_same_logprobs(a, b):
    """Per token: the same id and alternatives, log-probs within 1e-4 (a verifying step
    computes a row's positions together, which may round differently from one at a time)."""
    a = [lp for e in a for lp in (e.logprobs or [])]
    b = [lp for e in b for lp in (e.logprobs or [])]
    assert len(a) == len(b) > 0
    for x, y in zip(a, b):
        assert x.token_id == y.token_id and x.logprob == pytest.approx(y.logprob, abs=1e-4)
        assert [i for i, _ in x.top] == [i for i, _ in y.top]
        assert [v for _, v in x.top] == pytest.approx([v for _, v in y.top], abs=1e-4)


def _alone(loaded, params):
    with Engine(loaded, EngineConfig(block_size=8)) as engine:
        return [_events(engine, p, params) for p in _prompts(loaded.tokenizer)]


@pytest.mark.parametrize("wrong_at", [None, 0, 1, 2, -1])
@pytest.mark.parametrize("params", [GREEDY, SAMPLED], ids=["greedy", "sampled"])
def test_any_draft_gives_the_output_of_decoding_alone(loaded, monkeypatch, wrong_at, params):
    """Rows verify drafts side by side (and next to prefill chunks: a small budget cuts the
    prompts), and every row's ids and log-probs are those it has alone without drafts."""
    prompts = _prompts(loaded.tokenizer)
    alone = _alone(loaded, params)
    _script(monkeypatch, [p + _tokens(e) for p, e in zip(prompts, alone)], wrong_at)
    with Engine(loaded, EngineConfig(block_size=8, max_batch_tokens=6, speculative="ngram")) as engine:
        streams = [engine.submit(Request(p, params)) for p in prompts]
        together = [list(s) for s in streams]
        stats = engine.stats()
    assert [_tokens(e) for e in together] == [_tokens(e) for e in alone]
    if params.logprobs:
        for a, b in zip(together, alone):
            _assert_same_logprobs(a, b)
    assert stats["drafted_tokens"] > 0
    if wrong_at is None:
        assert stats["accepted_tokens"] == stats["drafted_tokens"]
    elif wrong_at in (0, -1):  # every draft is wrong at its first token
        assert stats["accepted_tokens"] == 0
    else:
        assert 0 < stats["accepted_tokens"] < stats["drafted_tokens"]


def test_the_ngram_drafter_changes_no_greedy_output(tiny_model_dir):
    """The real drafter, on the tiny Qwen3 model, whose greedy output falls into loops that
    it drafts from (the tiny Qwen3.5 rarely repeats itself; the scripted drafters above
    cover every path on both)."""
    loaded = load_model(str(tiny_model_dir("qwen3", "float32")), progress=False)
    prompts = _prompts(loaded.tokenizer)
    params = SamplingParams(max_tokens=64, temperature=0.0, ignore_eos=True)
    alone = [_tokens(e) for e in _alone(loaded, params)]
    with Engine(loaded, EngineConfig(block_size=8, speculative="ngram")) as engine:
        assert [_tokens(_events(engine, p, params)) for p in prompts] == alone
        stats = engine.stats()
    assert stats["accepted_tokens"] > 0


@pytest.mark.parametrize("max_tokens", [1, 2, 5])
def test_a_draft_never_runs_past_max_tokens_or_a_stop_token(loaded, monkeypatch, max_tokens):
    prompt = _prompts(loaded.tokenizer)[2]
    alone = _tokens(_events_alone(loaded, prompt, GREEDY))
    _script(monkeypatch, [prompt + alone], None)
    stop_at = alone[3]
    with Engine(loaded, EngineConfig(block_size=8, speculative="ngram", draft_tokens=8)) as engine:
        capped = _events(engine, prompt, SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True))
        stopped = _events(engine, prompt, SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True,
                                                         stop_token_ids=(stop_at,)))
    assert _tokens(capped) == alone[:max_tokens] and capped[-1].finish_reason == "length"
    assert _tokens(stopped) == alone[: alone.index(stop_at) + 1] and stopped[-1].finish_reason == "stop"


def test_draft_tokens_after_a_stop_inside_the_draft_count_as_neither_accepted_nor_decoded(loaded, monkeypatch):
    """A draft the target accepts whole, with a stop token inside it: the tokens after the
    stop are no part of the answer, so the counters leave them out (they counted them:
    `mlxserve run` showed more draft tokens accepted than tokens generated)."""
    prompt = _prompts(loaded.tokenizer)[2]
    alone = _tokens(_events_alone(loaded, prompt, GREEDY))
    _script(monkeypatch, [prompt + alone], None)
    # The first token of alone[2:] not seen before it: the answer stops there, inside the
    # first draft (alone[1:9]; alone[0] comes with the prompt).
    stop = next(i for i in range(2, 8) if alone[i] not in alone[:i])
    params = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True, stop_token_ids=(alone[stop],))
    with Engine(loaded, EngineConfig(block_size=8, speculative="ngram", draft_tokens=8)) as engine:
        events = _events(engine, prompt, params)
        stats = engine.stats()
    assert _tokens(events) == alone[: stop + 1] and events[-1].finish_reason == "stop"
    assert events[-1].completion_tokens == stop + 1
    assert stats["drafted_tokens"] == 8
    assert stats["accepted_tokens"] == stop  # alone[1 : stop + 1]
    assert stats["decode_tokens"] == stop  # every token but the first


def test_metrics_spread_a_step_s_wait_over_the_tokens_of_its_accepted_draft(loaded, monkeypatch):
    """/metrics' inter-token latency: a step that delivers several tokens (an accepted draft)
    counts as one gap per token of 1/n of its wait each, as bench's ITL does, so the count is
    the tokens after the first and the sum the time they took. It recorded the step's real
    gap once and a gap of 0 s for each other token; and the last step's final event, made a
    moment later, had a time of its own."""
    from mlxserve.metrics import Metrics

    prompt = _prompts(loaded.tokenizer)[2]
    alone = _tokens(_events_alone(loaded, prompt, GREEDY))
    _script(monkeypatch, [prompt + alone], None)  # every draft right: 4 tokens a step
    metrics, gaps = Metrics(), []
    observe = metrics.itl.observe
    monkeypatch.setattr(metrics.itl, "observe", lambda value: gaps.append(value) or observe(value))
    with Engine(loaded, EngineConfig(block_size=8, speculative="ngram", draft_tokens=3)) as engine:
        events = list(engine.submit(Request(prompt, GREEDY), on_finish=metrics.record))
    assert _tokens(events) == alone and events[-1].finish_reason == "length"
    steps = {}  # the engine's steps, by time: their tokens
    for e in events:
        steps[e.time] = steps.get(e.time, 0) + len(e.token_ids)
    assert list(steps.values()) == [1] + [4] * ((len(alone) - 1) // 4) + [(len(alone) - 1) % 4] * bool(
        (len(alone) - 1) % 4)
    want = [(b - a) / n for (a, _), (b, n) in zip(steps.items(), list(steps.items())[1:]) for _ in range(n)]
    assert gaps == pytest.approx(want) and all(gap > 0 for gap in gaps)
    assert metrics.itl.n == len(alone) - 1
    assert metrics.itl.total == pytest.approx(events[-1].time - events[0].time)


def _events_alone(loaded, prompt, params):
    with Engine(loaded, EngineConfig(block_size=8)) as engine:
        return _events(engine, prompt, params)


def test_rows_with_penalties_do_not_speculate(loaded):
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True, repetition_penalty=1.3)
    prompt = _prompts(loaded.tokenizer)[1]
    alone = _tokens(_events_alone(loaded, prompt, params))
    with Engine(loaded, EngineConfig(block_size=8, speculative="ngram")) as engine:
        assert _tokens(_events(engine, prompt, params)) == alone
        assert engine.stats()["drafted_tokens"] == 0


def test_preemption_of_speculating_rows_changes_no_output(loaded, monkeypatch):
    """A budget with room for about one and a half of the longest row's slots: rows
    verifying drafts wait, are preempted and recompute (a recompute may carry a draft too),
    and still match."""
    prompts = _prompts(loaded.tokenizer) * 2
    params = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
    alone = [_tokens(_events_alone(loaded, p, params)) for p in prompts]
    _script(monkeypatch, [p + a for p, a in zip(prompts, alone)], 1)
    layers, heads, dim = loaded.model.kv_shape()
    capacity = 16  # the slot a row of the longest prompt plus max_tokens gets, block size 4
    while capacity < max(len(p) for p in prompts) + params.max_tokens:
        capacity *= 2
    state = getattr(loaded.model, "state_bytes_per_row", lambda: 0)()
    budget = int(1.5 * (capacity * 2 * layers * heads * dim * 4 + 3 * state))
    config = EngineConfig(block_size=4, max_batch_tokens=64, speculative="ngram", memory_budget_bytes=budget)
    with Engine(loaded, config) as engine:
        streams = [engine.submit(Request(p, params)) for p in prompts]
        assert [_tokens(list(s)) for s in streams] == alone
        stats = engine.stats()
    assert stats["preemptions"] > 0 and stats["accepted_tokens"] > 0
    assert stats["kv_bytes_in_use"] == 0


def test_a_row_backs_off_after_failed_drafts(tiny_model_dir, monkeypatch):
    """Drafts that are always wrong: the row drafts after its 1st, 3rd, 7th, 15th, 31st and
    48th token (1, 3, 7, 15, then 16 steps without drafting after each miss), and its output
    is unchanged."""
    loaded = load_model(str(tiny_model_dir("qwen3", "float32")), progress=False)
    prompt = _prompts(loaded.tokenizer)[0]
    params = SamplingParams(max_tokens=64, temperature=0.0, ignore_eos=True)
    alone = _tokens(_events_alone(loaded, prompt, params))
    checked = []

    class Counting(Scripted):
        def propose(self, tokens, k):
            checked.append(len(tokens) - len(prompt))
            return super().propose(tokens, k)

    monkeypatch.setattr(scheduler_module, "make_drafter", lambda name, draft=None, capacity_for=None: Counting([prompt + alone], -1))
    with Engine(loaded, EngineConfig(block_size=8, speculative="ngram", draft_tokens=1)) as engine:
        assert _tokens(_events(engine, prompt, params)) == alone
    # After the m-th miss in a row, at generated token g, the next draft is at g + 2 ** m
    # (at most g + 17).
    assert checked == [1, 3, 7, 15, 31, 48]


def test_a_lone_row_whose_draft_outgrows_the_budget_ends_at_it(tiny_model_dir, monkeypatch):
    """Memory goes to a row's own tokens before its draft: a lone row whose draft does not fit
    drops the draft (it was preempting itself to recompute, then drafting again, for ever) and
    ends with "length" where the budget stops it, its tokens those of decoding alone."""
    loaded = load_model(str(tiny_model_dir("qwen3", "float32")), progress=False)
    prompt = _prompts(loaded.tokenizer)[2]
    params = SamplingParams(max_tokens=60, temperature=0.0, ignore_eos=True)
    alone = _tokens(_events_alone(loaded, prompt, params))
    _script(monkeypatch, [prompt + alone], None)
    layers, heads, dim = loaded.model.kv_shape()
    budget = 32 * 2 * layers * heads * dim * 4  # one 32-token slot
    sched = make_scheduler(loaded, EngineConfig(block_size=4, speculative="ngram", memory_budget_bytes=budget))
    sched.add(Request(prompt, params))
    events = []
    for _ in range(200):
        if not sched.has_work():
            break
        events += sched.step()
    assert not sched.has_work()
    assert events[-1].finish_reason == "length" and sched.stats.accepted_tokens > 0
    tokens = _tokens(events)
    # (the last token is never fed, so it needs no place in the slot)
    assert len(prompt) + len(tokens) == 32 + 1 and tokens == alone[: len(tokens)]
