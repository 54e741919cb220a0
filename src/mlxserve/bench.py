"""`mlxserve bench`: our engine against mlx-lm on the same weights and the same prompt ids.

Two scenarios:

- **closed loop** at each concurrency C: C requests are in flight at all times (the next one
  is submitted as one finishes) until N are done. Prompts are random token ids, seeded, so
  every engine sees the same ids; decoding is greedy, ignores EOS and makes exactly
  `gen_tokens` tokens per request.
- **long prompt**: S streams decode steadily; then one long prompt arrives. What chunked
  prefill is for: the streams' inter-token latency while it is admitted vs. their steady one.

Every figure comes from per-token timestamps (`RequestTrace`). Ours are the engine's own event
times; mlx-lm's are taken on the host as soon as its step returns the tokens, which is when
mlx-lm's own server could send them. mlx-lm runs `generate_step` at C = 1 and `BatchGenerator`
above, each with its default settings except the batch size, raised to hold C streams.

Each figure is the median over the measured runs (warm-up runs are not measured). Results
fill `BenchResults` run by run, so an interrupted bench still reports what it measured.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import itertools
import math
import os
import platform
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timezone

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten

from . import engine as engine_module
from .chat_render import plural
from .engine import Engine, EngineConfig
from .loader import LoadedModel
from .sampling import SamplingParams
from .scheduler import Request

OURS = "mlxserve"
MLX_LM = "mlx-lm"
COMPARE_CHOICES = (MLX_LM,)

# Prompt sets are seeded by [--seed, scenario, ...]: every run of every scenario draws its own.
_CLOSED_LOOP, _LONG_PROMPT, _PREFIX_REUSE = 0, 1, 2


# ---- configuration ---------------------------------------------------------------------------
@dataclass
class BenchConfig:
    prompt_tokens: int = 512
    gen_tokens: int = 128
    concurrency: tuple[int, ...] = (1, 8, 32, 64)
    requests: int | None = None  # per concurrency; None: default_requests(C)
    shared_prefix_tokens: int = 0
    long_prompt_tokens: int | None = None
    long_prompt_streams: int = 8
    chat_history_tokens: int | None = None
    warmup: int = 1
    runs: int = 3
    compare: str | None = None
    seed: int = 0
    engine: EngineConfig = field(default_factory=EngineConfig)

    def validate(self) -> None:
        """Raise ValueError naming the first bad flag."""
        checks = [
            (self.prompt_tokens >= 1, "--prompt-tokens must be >= 1"),
            (self.gen_tokens >= 1, "--gen-tokens must be >= 1"),
            (0 <= self.shared_prefix_tokens <= self.prompt_tokens,
             "--shared-prefix-tokens must be between 0 and --prompt-tokens"),
            (self.requests is None or self.requests >= max(self.concurrency),
             f"--requests must be >= the largest concurrency ({max(self.concurrency)})"),
            (self.requests is None or self.requests <= MAX_REQUESTS, f"--requests must be <= {MAX_REQUESTS:,}"),
            (self.long_prompt_streams <= MAX_STREAMS, f"--long-prompt-streams must be <= {MAX_STREAMS:,}"),
            (self.long_prompt_tokens is None or self.long_prompt_tokens >= 1, "--long-prompt-tokens must be >= 1"),
            (self.long_prompt_streams >= 1, "--long-prompt-streams must be >= 1"),
            (self.chat_history_tokens is None or self.chat_history_tokens >= 1, "--chat-history-tokens must be >= 1"),
            (self.warmup >= 0, "--warmup must be >= 0"),
            (self.runs >= 1, "--runs must be >= 1"),
            (0 <= self.seed < 2**64, "--seed must be a whole number from 0 to 2**64 - 1"),
            (self.compare in (None, *COMPARE_CHOICES), f"--compare must be one of: {', '.join(COMPARE_CHOICES)}"),
            (self.engine.max_batch_tokens >= 1, "--max-batch-tokens must be >= 1"),
            (self.engine.mixed_batch_tokens >= 1, "--mixed-batch-tokens must be >= 1"),
            (self.engine.block_size >= 1, "--block-size must be >= 1"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)

    def validate_for(self, loaded: LoadedModel) -> None:
        """Checks that need the model: every sequence must fit in its context."""
        limit = loaded.context_length
        # A block is the prefix cache's unit: one longer than any sequence is never filled, so
        # nothing is reused (the chat scenario measured nothing), and each slot is a block long.
        if self.engine.block_size > limit:
            raise ValueError(f"--block-size ({self.engine.block_size:,}) must be at most the model's context "
                             f"length ({limit:,})")
        if self.prompt_tokens + self.gen_tokens > limit:
            raise ValueError(f"--prompt-tokens + --gen-tokens ({self.prompt_tokens + self.gen_tokens:,}) "
                             f"exceed the model's context length ({limit:,})")
        if self.chat_history_tokens is not None and (
                self.chat_history_tokens + self.gen_tokens + CHAT_FOLLOW_UP_TOKENS >= limit):
            raise ValueError(f"--chat-history-tokens + --gen-tokens + {CHAT_FOLLOW_UP_TOKENS} must be below the "
                             f"model's context length ({limit:,})")
        if self.long_prompt_tokens is not None:
            if self.long_prompt_tokens >= limit:
                raise ValueError(f"--long-prompt-tokens ({self.long_prompt_tokens:,}) must be below the "
                                 f"model's context length ({limit:,})")
            # That scenario's streams decode --gen-tokens steady tokens, then go on decoding
            # while the long prompt is admitted: a step per chunk of it, at least one per
            # --mixed-batch-tokens. Their context must hold all of that, or a stream ends first
            # (with --prompt-tokens + --gen-tokens at the context, the bench failed with a
            # traceback; just below it, its admission figures were empty).
            admission_steps = -(-self.long_prompt_tokens // self.engine.decoding_batch_tokens)
            needed = self.prompt_tokens + self.gen_tokens + admission_steps
            if needed >= limit:
                raise ValueError(
                    f"--prompt-tokens + --gen-tokens ({self.prompt_tokens + self.gen_tokens:,}) leave the "
                    f"--long-prompt-tokens scenario's streams no room to decode while the long prompt is "
                    f"admitted: they must be below the model's context length ({limit:,}) by more than "
                    f"{plural(admission_steps, 'token')}")

    def requests_for(self, concurrency: int) -> int:
        return self.requests or default_requests(concurrency)


def default_requests(concurrency: int) -> int:
    """Twice the concurrency (at least 4): every slot serves a second request that joins a
    running batch, so the figures are not just one synchronized wave."""
    return max(4, 2 * concurrency)


# Beyond these the bench would only build prompts: a level's requests are drawn up front, and
# --concurrency 100000000000000000000 grew memory without end and never reached a run.
MAX_STREAMS = 4096
MAX_REQUESTS = 65536


def parse_concurrency(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(part) for part in text.split(","))
    except ValueError:
        values = ()
    if not values or min(values) < 1:
        raise ValueError(f"--concurrency: expected comma-separated integers >= 1, got '{text}'")
    if max(values) > MAX_STREAMS:
        raise ValueError(f"--concurrency: at most {MAX_STREAMS:,} streams a level, got '{text}'")
    if len(set(values)) != len(values):
        raise ValueError(f"--concurrency: each level once, got '{text}'")
    return values


# ---- workload --------------------------------------------------------------------------------
def make_prompts(count: int, length: int, shared_prefix: int, vocab_size: int, seed: list[int]) -> list[list[int]]:
    """`count` prompts of exactly `length` random ids; the first `shared_prefix` are the same
    in all of them. Each run draws its own set, so a prefix cache never sees a repeat from
    an earlier run (only the intended shared prefix within one run)."""
    rng = np.random.default_rng(seed)
    prefix = rng.integers(0, vocab_size, shared_prefix).tolist()
    return [prefix + rng.integers(0, vocab_size, length - shared_prefix).tolist() for _ in range(count)]


def prompt_vocab_size(loaded: LoadedModel) -> int:
    """Ids every part of the model understands: the embedding rows, bounded by the tokenizer
    (checkpoints often pad the embedding past the vocabulary). The model's own arguments say
    how many rows it has: a Hugging Face Qwen3.5 config keeps vocab_size under text_config."""
    args = getattr(loaded.model, "args", None)
    embedding_rows = getattr(args, "vocab_size", None) or loaded.config["vocab_size"]
    return min(embedding_rows, getattr(loaded.tokenizer, "vocab_size", embedding_rows))


# ---- traces and statistics -------------------------------------------------------------------
@dataclass
class RequestTrace:
    """When one request was submitted and when each of its tokens arrived."""

    prompt_tokens: int
    submit: float
    deliveries: list[tuple[float, int]] = field(default_factory=list)  # (time, tokens delivered)
    cached_tokens: int = 0

    def add(self, when: float, tokens: int) -> None:
        if not tokens:
            return
        # The engine sends a token an event, and a step's events share its time: the tokens of
        # an accepted speculative draft are one delivery (inter_token_latencies spreads its
        # gap over them), not one gap and then gaps of 0 s.
        if self.deliveries and self.deliveries[-1][0] == when:
            self.deliveries[-1] = (when, self.deliveries[-1][1] + tokens)
        else:
            self.deliveries.append((when, tokens))

    @property
    def generated(self) -> int:
        return sum(n for _, n in self.deliveries)

    @property
    def ttft(self) -> float | None:
        return self.deliveries[0][0] - self.submit if self.deliveries else None

    @property
    def decode_rate(self) -> float | None:
        """Tokens after the first one per second between the first and the last."""
        if len(self.deliveries) < 2:
            return None
        (first, first_n), (last, _) = self.deliveries[0], self.deliveries[-1]
        return (self.generated - first_n) / (last - first) if last > first else None


def inter_token_latencies(deliveries: list[tuple[float, int]], after: float = -math.inf,
                          until: float = math.inf) -> list[float]:
    """Gaps between consecutive deliveries that end in (after, until]. A delivery of n tokens
    (speculative decoding) counts as n gaps of 1/n of its wait each."""
    gaps = []
    for (previous, _), (when, n) in zip(deliveries, deliveries[1:]):
        if after < when <= until:
            gaps.extend([(when - previous) / n] * n)
    return gaps


def percentile(values: list[float], p: float) -> float | None:
    """Linear interpolation between closest ranks (numpy's default); None when empty."""
    if not values:
        return None
    xs = sorted(values)
    rank = (len(xs) - 1) * p / 100
    low = math.floor(rank)
    high = min(low + 1, len(xs) - 1)
    return xs[low] + (xs[high] - xs[low]) * (rank - low)


def _mean(values: list[float]) -> float | None:
    return statistics.fmean(values) if values else None


def summarize_closed_loop(traces: list[RequestTrace], peak_memory: int) -> dict:
    ttfts = [t.ttft for t in traces if t.ttft is not None]
    itls = [gap for t in traces for gap in inter_token_latencies(t.deliveries)]
    generated = sum(t.generated for t in traces)
    wall = max(t.deliveries[-1][0] for t in traces if t.deliveries) - min(t.submit for t in traces)
    return {
        "requests": len(traces),
        "prompt_tokens": sum(t.prompt_tokens for t in traces),
        "generated_tokens": generated,
        "cached_tokens": sum(t.cached_tokens for t in traces),
        "wall_s": wall,
        "ttft_p50_s": percentile(ttfts, 50),
        "ttft_p99_s": percentile(ttfts, 99),
        "itl_p50_s": percentile(itls, 50),
        "itl_p99_s": percentile(itls, 99),
        "decode_tok_s": _mean([r for t in traces if (r := t.decode_rate) is not None]),
        "total_tok_s": generated / wall if wall > 0 else None,
        # Tokens the engine computed before the first token: the prefix cache's are not.
        "prefill_tok_s": _mean([(t.prompt_tokens - t.cached_tokens) / t.ttft for t in traces if t.ttft]),
        "peak_memory_bytes": peak_memory,
    }


@dataclass
class LongPromptTrace:
    streams: list[RequestTrace]
    long: RequestTrace
    steady_start: float  # every stream has its first token
    # The long prompt was submitted at long.submit; its first token is long.deliveries[0].


def summarize_long_prompt(trace: LongPromptTrace, peak_memory: int) -> dict:
    admitted = trace.long.deliveries[0][0]
    steady = [g for s in trace.streams for g in inter_token_latencies(s.deliveries, trace.steady_start, trace.long.submit)]
    admission = [g for s in trace.streams for g in inter_token_latencies(s.deliveries, trace.long.submit, admitted)]
    steady_p50, admission_p99 = percentile(steady, 50), percentile(admission, 99)
    return {
        "streams": len(trace.streams),
        "long_prompt_tokens": trace.long.prompt_tokens,
        "steady_itl_p50_s": steady_p50,
        "steady_itl_p99_s": percentile(steady, 99),
        "admission_itl_p50_s": percentile(admission, 50),
        "admission_itl_p99_s": admission_p99,
        "admission_itl_max_s": max(admission, default=None),
        "stall_ratio": admission_p99 / steady_p50 if admission_p99 and steady_p50 else None,
        "long_ttft_s": trace.long.ttft,
        "long_prefill_tok_s": trace.long.prompt_tokens / trace.long.ttft,
        "peak_memory_bytes": peak_memory,
    }


@dataclass(frozen=True)
class Figure:
    key: str
    label: str
    unit: str  # "s" (shown in ms), "tok/s", "bytes" (shown in GB) or "x"
    higher_is_better: bool

    def format(self, value: float | None) -> str:
        if value is None:
            return "–"
        if self.unit == "s":
            return f"{value * 1e3:.1f} ms"
        if self.unit == "bytes":
            return f"{value / 1e9:.2f} GB" if value >= 1e9 else f"{value / 1e6:.1f} MB"
        if self.unit == "x":
            return f"{value:.2f}×"
        if self.unit == "tok":
            return f"{value:,.0f}"
        return f"{value:,.1f}"

    def speedup(self, ours: float | None, theirs: float | None) -> float | None:
        """> 1 means ours is better, whichever direction this figure improves in."""
        if not ours or not theirs:
            return None
        return ours / theirs if self.higher_is_better else theirs / ours


CLOSED_LOOP_FIGURES = (
    Figure("ttft_p50_s", "TTFT p50", "s", False),
    Figure("ttft_p99_s", "TTFT p99", "s", False),
    Figure("itl_p50_s", "ITL p50", "s", False),
    Figure("itl_p99_s", "ITL p99", "s", False),
    Figure("decode_tok_s", "decode tok/s", "tok/s", True),
    Figure("total_tok_s", "total tok/s", "tok/s", True),
    Figure("prefill_tok_s", "prefill tok/s", "tok/s", True),
    Figure("peak_memory_bytes", "peak mem", "bytes", False),
)
PREFIX_REUSE_FIGURES = (
    Figure("ttft_with_cache_s", "2nd-turn TTFT, prefix cache", "s", False),
    Figure("ttft_without_cache_s", "2nd-turn TTFT, no cache", "s", False),
    Figure("cache_speedup", "speedup", "x", True),
    Figure("cached_tokens", "cached tokens", "tok", True),
)
CHAT_FOLLOW_UP_TOKENS = 32  # the user's next message in the prefix-reuse scenario
LONG_PROMPT_FIGURES = (
    Figure("steady_itl_p50_s", "steady ITL p50", "s", False),
    Figure("steady_itl_p99_s", "steady ITL p99", "s", False),
    Figure("admission_itl_p99_s", "admission ITL p99", "s", False),
    Figure("admission_itl_max_s", "admission ITL max", "s", False),
    Figure("stall_ratio", "stall (p99/steady)", "x", False),
    Figure("long_ttft_s", "long TTFT", "s", False),
    Figure("peak_memory_bytes", "peak mem", "bytes", False),
)


# ---- results -----------------------------------------------------------------------------------
class BenchResults:
    """Everything measured so far, per engine: one entry per concurrency and one for the long
    prompt scenario, each with its runs and their medians."""

    def __init__(self, config: dict):
        self.config = config
        self.engines: dict[str, dict] = {}
        self.partial = False

    def new_entry(self, engine: str, scenario: str, **meta) -> dict:
        entry = {**meta, "runs": [], "median": {}}
        scenarios = self.engines.setdefault(engine, {"concurrency": [], "long_prompt": None})
        if scenario == "concurrency":
            scenarios["concurrency"].append(entry)
        else:
            scenarios[scenario] = entry
        return entry

    @staticmethod
    def add_run(entry: dict, figures: dict) -> None:
        entry["runs"].append(figures)
        entry["median"] = {key: _median([run[key] for run in entry["runs"]]) for key in figures}

    def entries(self, engine: str) -> dict[int, dict]:
        """Concurrency -> entry, for entries with at least one measured run."""
        scenarios = self.engines.get(engine, {"concurrency": []})
        return {e["concurrency"]: e for e in scenarios["concurrency"] if e["runs"]}

    def long_prompt(self, engine: str) -> dict | None:
        return self.scenario(engine, "long_prompt")

    def scenario(self, engine: str, name: str) -> dict | None:
        entry = self.engines.get(engine, {}).get(name)
        return entry if entry and entry["runs"] else None

    def ratios(self) -> dict:
        """Speedups of ours over the compared engine (> 1: ours better) where both ran."""
        other = self.config.get("compare")
        if not other:
            return {}
        ours, theirs = self.entries(OURS), self.entries(other)
        result = {"concurrency": [
            {"concurrency": c, **_speedups(CLOSED_LOOP_FIGURES, ours[c]["median"], theirs[c]["median"])}
            for c in ours if c in theirs
        ]}
        if self.long_prompt(OURS) and self.long_prompt(other):
            result["long_prompt"] = _speedups(LONG_PROMPT_FIGURES, self.long_prompt(OURS)["median"],
                                              self.long_prompt(other)["median"])
        return result

    def to_json(self) -> dict:
        return {"config": self.config, "partial": self.partial, "results": self.engines,
                "speedups": self.ratios()}


def _median(values: list) -> float | int | None:
    """The median of the runs' values that are there. A count (requests, tokens, bytes: ints
    in every run) is the lower median, the count of one of the runs (every run's where they
    agree): the mean of the middle two, with an even number of runs, was a count no run had,
    x.5 tokens. Times and rates are the usual median."""
    present = [v for v in values if v is not None]
    if not present:
        return None
    if all(isinstance(v, int) for v in present):
        return statistics.median_low(present)
    return statistics.median(present)


def _speedups(figures: tuple[Figure, ...], ours: dict, theirs: dict) -> dict:
    return {f.key: f.speedup(ours.get(f.key), theirs.get(f.key)) for f in figures}


def describe_run(loaded: LoadedModel, cfg: BenchConfig, random_shape: str | None) -> dict:
    """The configuration part of the JSON: enough to reproduce the numbers."""
    import mlx_lm

    from . import __version__

    return {
        "model": loaded.name,
        "random_weights": random_shape,
        "format": loaded.format,
        "quantization": loaded.quantization,
        "model_config": loaded.config,
        "prompt_tokens": cfg.prompt_tokens,
        "gen_tokens": cfg.gen_tokens,
        "concurrency": list(cfg.concurrency),
        "requests": {str(c): cfg.requests_for(c) for c in cfg.concurrency},
        "shared_prefix_tokens": cfg.shared_prefix_tokens,
        "long_prompt_tokens": cfg.long_prompt_tokens,
        "long_prompt_streams": cfg.long_prompt_streams,
        "chat_history_tokens": cfg.chat_history_tokens,
        "warmup": cfg.warmup,
        "runs": cfg.runs,
        "seed": cfg.seed,
        "compare": cfg.compare,
        # What the engine runs with: make_scheduler gives it the model's context length.
        "engine": {**asdict(cfg.engine), "context_length": loaded.context_length},
        "versions": {"mlxserve": __version__, "mlx": mx.__version__, "mlx_lm": mlx_lm.__version__,
                     "python": platform.python_version()},
        "device": {"default": str(mx.default_device()), **mx.device_info()},
        "platform": platform.platform(),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


# ---- our engine ----------------------------------------------------------------------------------
def _greedy(max_tokens: int) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)


class OurBackend:
    """Drives mlxserve's Engine from one asyncio loop: one task per request in flight.

    Every run gets a fresh engine. With the prefix cache on and no memory budget the engine
    keeps the KV of finished requests; one engine across runs would pile up every run's KV
    (tens of GB at C=64 on real shapes) and no run would be like another. MLX's kernel and
    buffer caches are process-wide, so warm-up runs still warm what matters.
    """

    name = OURS

    def __init__(self, loaded: LoadedModel, engine_config: EngineConfig):
        self.loaded = loaded
        self.engine_config = engine_config
        self.engine: Engine | None = None
        self.last_stats: dict | None = None  # the engine's stats at the end of the last run

    @contextlib.contextmanager
    def _engine(self, rows: int):
        config = replace(self.engine_config, max_running=max(self.engine_config.max_running, rows))
        with Engine(self.loaded, config) as self.engine:
            yield
            # (max_running as run: raised to the concurrency where the flag's is lower)
            self.last_stats = {**self.engine.stats(), "max_running": config.max_running}

    def closed_loop(self, prompts: list[list[int]], gen_tokens: int, concurrency: int, on_done) -> list[RequestTrace]:
        with self._engine(concurrency):
            return asyncio.run(self._until_done(self._closed_loop(prompts, gen_tokens, concurrency, on_done)))

    def long_prompt(self, streams: list[list[int]], long: list[int], steady_tokens: int, stream_tokens: int) -> LongPromptTrace:
        with self._engine(len(streams) + 1):
            return asyncio.run(self._until_done(self._long_prompt(streams, long, steady_tokens, stream_tokens)))

    def chat_second_turn(self, history: list[int], follow_up: list[int], gen_tokens: int, prefix_cache: bool) -> dict:
        """Turn 1 answers `history`; turn 2 sends history + answer + follow-up. Returns the
        second turn's time to first token and how many of its tokens came from the cache."""
        with Engine(self.loaded, replace(self.engine_config, prefix_cache=prefix_cache)) as engine:
            answer = [t for e in engine.submit(Request(history, _greedy(gen_tokens))) for t in e.token_ids]
            submit = time.perf_counter()
            events = list(engine.submit(Request(history + answer + follow_up, _greedy(1))))
        if events[-1].finish_reason == "error":
            raise RuntimeError(f"mlxserve request failed: {events[-1].error}")
        return {"ttft_s": events[0].time - submit, "cached_tokens": events[-1].cached_tokens}

    async def _until_done(self, work):
        try:
            return await work
        except BaseException as exc:
            # Ctrl-C (the loop cancels us) or a failed request: stop the engine while this
            # loop is still open, so that the last events it pushes to our streams (their
            # cancellation) land in a live loop rather than a closed one.
            try:
                if isinstance(exc, (KeyboardInterrupt, asyncio.CancelledError)):
                    print("bench: stopping once the engine's step in flight ends (Ctrl-C again quits without "
                          "the results)", file=sys.stderr, flush=True)
                self.engine.stop()
            except KeyboardInterrupt:
                # The second Ctrl-C came before stop() began to wait (which answers one by
                # quitting at once): quit now as well. Raised on instead, it would reach the
                # Engine's `with` block, whose stop() would wait for the step after all.
                if engine_module.on_ctrl_c_while_stopping is not None:
                    engine_module.on_ctrl_c_while_stopping()
                raise
            raise

    def _submit(self, prompt: list[int], max_tokens: int) -> tuple:
        trace = RequestTrace(len(prompt), time.perf_counter())
        stream = self.engine.submit(Request(prompt, _greedy(max_tokens)), asyncio.get_running_loop())
        return trace, stream

    @staticmethod
    async def _consume(stream, trace: RequestTrace, on_event=None) -> None:
        async for event in stream:
            if event.finish_reason == "error":
                raise RuntimeError(f"mlxserve request failed: {event.error}")
            trace.add(event.time, len(event.token_ids))
            trace.cached_tokens = max(trace.cached_tokens, event.cached_tokens)
            if on_event:
                on_event()

    async def _closed_loop(self, prompts, gen_tokens, concurrency, on_done) -> list[RequestTrace]:
        queue = iter(prompts)  # shared by the workers: each takes the next prompt when free
        traces: list[RequestTrace] = []

        async def worker():
            for prompt in queue:
                trace, stream = self._submit(prompt, gen_tokens)
                traces.append(trace)
                await self._consume(stream, trace)
                on_done()

        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return traces

    async def _long_prompt(self, prompts, long_prompt, steady_tokens, stream_tokens) -> LongPromptTrace:
        changed = asyncio.Event()
        submitted = [self._submit(p, stream_tokens) for p in prompts]
        traces = [trace for trace, _ in submitted]
        tasks = [asyncio.create_task(self._consume(stream, trace, changed.set)) for trace, stream in submitted]
        for task in tasks:  # a stream that ends (or fails) wakes `until` too
            task.add_done_callback(lambda _: changed.set())

        async def until(predicate):
            while not predicate():
                for task in tasks:
                    if task.done():
                        task.result()  # re-raises a failed stream; a finished one is a bug
                        raise RuntimeError("a stream ended before the long prompt was admitted")
                changed.clear()
                await changed.wait()

        await until(lambda: all(t.deliveries for t in traces))
        steady_start = max(t.deliveries[0][0] for t in traces)
        # The last stream to start has 1 token at steady_start: wait for steady_tokens more.
        await until(lambda: min(t.generated for t in traces) > steady_tokens)
        long_trace, long_stream = self._submit(long_prompt, 1)
        await self._consume(long_stream, long_trace)
        for _, stream in submitted:
            stream.cancel()
        await asyncio.gather(*tasks)
        return LongPromptTrace(traces, long_trace, steady_start)


# ---- mlx-lm ----------------------------------------------------------------------------------
def mlx_lm_model(loaded: LoadedModel) -> nn.Module:
    """mlx-lm's class for the same architecture, holding the very same weight buffers as ours
    (our parameter names are mlx-lm's), quantized module by module as ours is."""
    arch = loaded.config.get("model_type", "?")
    try:
        module = importlib.import_module(f"mlx_lm.models.{arch}")
        model = module.Model(module.ModelArgs.from_dict(loaded.config))
    except (ImportError, TypeError, ValueError) as exc:
        raise ValueError(f"--compare mlx-lm: cannot build mlx-lm's '{arch}' model: {exc}") from exc
    prefix = _their_prefix(model)
    quantized = {prefix + part: m for path, m in loaded.model.named_modules() if hasattr(m, "bits")
                 for part in _checkpoint_paths(path)}
    if quantized:
        def predicate(path: str, _module):
            q = quantized.get(path)
            return q is not None and {"group_size": q.group_size, "bits": q.bits, "mode": q.mode}

        nn.quantize(model, class_predicate=predicate)
    # mlx-lm may build other layers than ours from the same config (Qwen3.5 whose layer_types
    # do not follow full_attention_interval: mlx-lm goes by the interval), then the parameters
    # differ: said in one line, not left to a KeyError or load_weights' list.
    try:
        ours = _checkpoint_weights(loaded.model, model, prefix)
    except KeyError as exc:  # a fused projection of ours whose parts mlx-lm's model has not
        ours, differ = {}, [str(exc.args[0] if exc.args else exc)]
    else:
        theirs = {name for name, _ in tree_flatten(model.parameters())}
        differ = sorted({prefix + name for name in ours} ^ theirs)
    if differ:
        raise ValueError(f"--compare mlx-lm: cannot build mlx-lm's '{arch}' model: its parameters differ "
                         f"from mlxserve's ({', '.join(differ[:3])}{', ...' if len(differ) > 3 else ''})")
    try:
        model.load_weights([(prefix + name, value) for name, value in ours.items()], strict=True)
    except ValueError as exc:  # shapes that differ
        raise ValueError(f"--compare mlx-lm: cannot build mlx-lm's '{arch}' model: "
                         f"{' '.join(str(exc).split())}") from exc
    return model


def _their_prefix(theirs: nn.Module) -> str:
    """mlx-lm nests Qwen3.5's text model under `language_model` (the checkpoint's vision
    tower would sit beside it); our names are those of the text model."""
    return "language_model." if "language_model" in theirs else ""


# Projections our models fuse after loading (models/llama.py), and the checkpoint's parts of each.
_FUSED_PARTS = {
    "qkv_proj": ("q_proj", "k_proj", "v_proj"),
    # Qwen3.5's gated attention, rows ordered Q, K, V, gate (models/qwen3_5.py); the
    # checkpoint's q_proj holds each head's query and gate side by side.
    "qkvg_proj": ("q_proj", "k_proj", "v_proj"),
    "gate_up_proj": ("gate_proj", "up_proj"),
    "in_proj_qkvzba": ("in_proj_qkv", "in_proj_z", "in_proj_b", "in_proj_a"),
    "in_proj_qkvz": ("in_proj_qkv", "in_proj_z"),
    "in_proj_ba": ("in_proj_b", "in_proj_a"),
}


def _checkpoint_paths(path: str) -> list[str]:
    parent, _, name = path.rpartition(".")
    parts = _FUSED_PARTS.get(name)
    return [f"{parent}.{part}" for part in parts] if parts else [path]


def _checkpoint_weights(ours: nn.Module, theirs: nn.Module, prefix: str = "") -> dict[str, mx.array]:
    """Our parameters under the checkpoint's names. A fused projection is cut back into its
    parts by rows, sized by `theirs`; row slices are views of the fused arrays, so the two
    models share one copy of the weights and neither engine's peak memory counts the other's.
    (Except Qwen3.5's attention query/gate rows, which the checkpoint interleaves per head: a
    copy of those, about 3-4 % of the weights, which the peak memory of both engines then
    includes in a --compare run.)"""
    shapes = {name: p.shape for name, p in tree_flatten(theirs.parameters())}
    modules = dict(ours.named_modules())
    weights = {}
    for name, value in tree_flatten(ours.parameters()):
        module, _, leaf = name.rpartition(".")
        parts = _checkpoint_paths(module)
        if len(parts) == 1:
            weights[name] = value
            continue
        if module.endswith(".qkvg_proj"):
            attention = modules[module.rpartition(".")[0]]
            heads, d = attention.n_heads, attention.head_dim
            kv_rows = attention.n_kv_heads * d
            q, k, v, gate = mx.split(value, [heads * d, heads * d + kv_rows, heads * d + 2 * kv_rows])
            per_head = mx.stack([q.reshape(heads, d, *q.shape[1:]), gate.reshape(heads, d, *q.shape[1:])], axis=1)
            weights[f"{parts[0]}.{leaf}"] = per_head.reshape(2 * heads * d, *q.shape[1:])
            weights[f"{parts[1]}.{leaf}"], weights[f"{parts[2]}.{leaf}"] = k, v
            continue
        start = 0
        for part in parts:
            rows = shapes[f"{prefix}{part}.{leaf}"][0]
            weights[f"{part}.{leaf}"] = value[start:start + rows]
            start += rows
    return weights


class MlxLmBackend:
    """mlx-lm 0.32's own loops: `generate_step` for one stream, `BatchGenerator` for more."""

    name = MLX_LM

    def __init__(self, loaded: LoadedModel):
        self.model = mlx_lm_model(loaded)
        self.last_stats = None

    def closed_loop(self, prompts: list[list[int]], gen_tokens: int, concurrency: int, on_done) -> list[RequestTrace]:
        if concurrency == 1:
            return self._one_by_one(prompts, gen_tokens, on_done)
        with _Batch(self.model, concurrency) as batch:
            pending = iter(prompts)
            for prompt in itertools.islice(pending, concurrency):
                batch.submit(prompt, gen_tokens)
            while len(batch.finished) < len(prompts):
                for _ in batch.step():
                    on_done()
                    if (prompt := next(pending, None)) is not None:
                        batch.submit(prompt, gen_tokens)
            return list(batch.traces.values())

    def _one_by_one(self, prompts, gen_tokens, on_done) -> list[RequestTrace]:
        from mlx_lm.generate import generate_step

        traces = []
        for prompt in prompts:
            trace = RequestTrace(len(prompt), time.perf_counter())
            for _token, _logprobs in generate_step(mx.array(prompt), self.model, max_tokens=gen_tokens):
                trace.add(time.perf_counter(), 1)
            traces.append(trace)
            on_done()
        return traces

    def long_prompt(self, streams: list[list[int]], long: list[int], steady_tokens: int, stream_tokens: int) -> LongPromptTrace:
        # Room for every stream plus the long prompt: it must be admitted while they decode.
        with _Batch(self.model, len(streams) + 1) as batch:
            traces = [batch.submit(p, stream_tokens) for p in streams]
            while not all(t.deliveries for t in traces):
                batch.step()
            steady_start = max(t.deliveries[0][0] for t in traces)
            while min(t.generated for t in traces) <= steady_tokens:
                batch.step()
            long_trace = batch.submit(long, 1)
            while not long_trace.deliveries:
                batch.step()
            return LongPromptTrace(traces, long_trace, steady_start)


class _Batch:
    """A BatchGenerator with a trace per request; tokens are stamped when `next()` returns."""

    def __init__(self, model: nn.Module, rows: int):
        from mlx_lm.generate import BatchGenerator

        # No stop tokens: mlx-lm then stops only at max_tokens, i.e. it ignores EOS.
        self.generator = BatchGenerator(model, completion_batch_size=rows)
        self.traces: dict[int, RequestTrace] = {}
        self.finished: list[int] = []

    def __enter__(self) -> "_Batch":
        return self

    def __exit__(self, *exc) -> None:
        self.generator.close()

    def submit(self, prompt: list[int], max_tokens: int) -> RequestTrace:
        trace = RequestTrace(len(prompt), time.perf_counter())
        [uid] = self.generator.insert([prompt], [max_tokens])
        self.traces[uid] = trace
        return trace

    def step(self) -> list[RequestTrace]:
        """One `next()`; returns the traces of requests that finished in it."""
        _, responses = self.generator.next()
        now = time.perf_counter()
        done = []
        for response in responses:
            self.traces[response.uid].add(now, 1)
            if response.finish_reason is not None:
                self.finished.append(response.uid)
                done.append(self.traces[response.uid])
        return done


# ---- the benchmark ------------------------------------------------------------------------------
def run_bench(loaded: LoadedModel, cfg: BenchConfig, results: BenchResults, progress) -> None:
    """Run every scenario on every engine, adding each measured run to `results` as it ends.

    Engines take turns run by run (warm-up runs included), each turn on the same prompts: the
    host's speed drifts during a bench (on the GPU machine one process ran the same code at
    half the speed of the next), and two adjacent runs share most of that drift. So the
    medians of several runs compare the engines fairly, and an interrupted bench has
    comparable pairs.
    """
    backends = [OurBackend(loaded, cfg.engine)]
    if cfg.compare == MLX_LM:
        backends.append(MlxLmBackend(loaded))
    vocab = prompt_vocab_size(loaded)
    for concurrency in cfg.concurrency:
        count = cfg.requests_for(concurrency)
        entries = [results.new_entry(backend.name, "concurrency", concurrency=concurrency, requests=count)
                   for backend in backends]
        for run in range(cfg.warmup + cfg.runs):
            prompts = make_prompts(count, cfg.prompt_tokens, cfg.shared_prefix_tokens, vocab,
                                   [cfg.seed, _CLOSED_LOOP, concurrency, run])
            for backend, entry in zip(backends, entries):
                progress.phase(f"{backend.name} C={concurrency} {_run_label(run, cfg)}", count)
                _forget_other_engines_buffers(backends)
                mx.reset_peak_memory()
                traces = backend.closed_loop(prompts, cfg.gen_tokens, concurrency, progress.advance)
                if run >= cfg.warmup:
                    results.add_run(entry, summarize_closed_loop(traces, mx.get_peak_memory()))
                    entry["engine_stats"] = backend.last_stats
    if cfg.chat_history_tokens is not None:
        run_prefix_reuse(backends[0], cfg, vocab, results, progress)
    if cfg.long_prompt_tokens is None:
        return
    streams = cfg.long_prompt_streams
    # Streams must outlast the long prompt's admission; the context bounds them (ours stops
    # a row at the context length), and the bench cancels them once it has its figures.
    stream_tokens = loaded.context_length - cfg.prompt_tokens
    entries = [results.new_entry(backend.name, "long_prompt", streams=streams, long_prompt_tokens=cfg.long_prompt_tokens)
               for backend in backends]
    for run in range(cfg.warmup + cfg.runs):
        prompts = make_prompts(streams, cfg.prompt_tokens, 0, vocab, [cfg.seed, _LONG_PROMPT, run, 0])
        long = make_prompts(1, cfg.long_prompt_tokens, 0, vocab, [cfg.seed, _LONG_PROMPT, run, 1])[0]
        for backend, entry in zip(backends, entries):
            progress.phase(f"{backend.name} long prompt {plural(cfg.long_prompt_tokens, 'token')}, "
                           f"{plural(streams, 'stream')}, {_run_label(run, cfg)}", None)
            _forget_other_engines_buffers(backends)
            mx.reset_peak_memory()
            trace = backend.long_prompt(prompts, long, cfg.gen_tokens, stream_tokens)
            if run >= cfg.warmup:
                results.add_run(entry, summarize_long_prompt(trace, mx.get_peak_memory()))


def _forget_other_engines_buffers(backends: list) -> None:
    """Before an engine's turn, when engines take turns: MLX's cache of freed buffers emptied,
    so that each runs as it would alone, not among the other engine's freed buffers (tens of
    GB after mlx-lm's 64-stream run), which MLX must free as memory runs short. Without it,
    mlxserve's Qwen3-0.6B made 3,606 total tok/s at 64 streams right after mlx-lm's run and
    4,657-4,804 alone (H100, docs/performance-history.md, session 34)."""
    if len(backends) > 1:
        mx.clear_cache()


def run_prefix_reuse(backend: OurBackend, cfg: BenchConfig, vocab: int, results: BenchResults, progress) -> None:
    """A chat's second turn with `chat_history_tokens` of history: first-token time with the
    prefix cache against the same engine with the cache off."""
    entry = results.new_entry(OURS, "prefix_reuse", history_tokens=cfg.chat_history_tokens)
    for run in range(cfg.warmup + cfg.runs):
        history = make_prompts(1, cfg.chat_history_tokens, 0, vocab, [cfg.seed, _PREFIX_REUSE, run, 0])[0]
        follow_up = make_prompts(1, CHAT_FOLLOW_UP_TOKENS, 0, vocab, [cfg.seed, _PREFIX_REUSE, run, 1])[0]
        progress.phase(f"{OURS} chat second turn after {plural(cfg.chat_history_tokens, 'token')}, "
                       f"{_run_label(run, cfg)}", None)
        cached = backend.chat_second_turn(history, follow_up, cfg.gen_tokens, prefix_cache=True)
        uncached = backend.chat_second_turn(history, follow_up, cfg.gen_tokens, prefix_cache=False)
        if run >= cfg.warmup:
            results.add_run(entry, {
                "ttft_with_cache_s": cached["ttft_s"],
                "ttft_without_cache_s": uncached["ttft_s"],
                "cache_speedup": uncached["ttft_s"] / cached["ttft_s"],
                "cached_tokens": cached["cached_tokens"],
            })


def _run_label(run: int, cfg: BenchConfig) -> str:
    if run < cfg.warmup:
        return f"warm-up {run + 1}/{cfg.warmup}"
    return f"run {run - cfg.warmup + 1}/{cfg.runs}"


# ---- output ------------------------------------------------------------------------------------
class Progress:
    """A progress bar on a terminal, one line per phase otherwise (logs of remote runs)."""

    def __init__(self, console):
        self.console = console
        self._bar = None
        self._task = None

    def __enter__(self) -> "Progress":
        if self.console.is_terminal:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress as Bar, TextColumn, TimeElapsedColumn

            self._bar = Bar(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                            TimeElapsedColumn(), console=self.console, transient=True)
            self._bar.start()
        return self

    def __exit__(self, *exc) -> None:
        if self._bar is not None:
            self._bar.stop()

    def phase(self, description: str, total: int | None) -> None:
        if self._bar is None:
            self.console.print(f"bench: {description}", highlight=False)
            return
        if self._task is not None:
            self._bar.remove_task(self._task)
        self._task = self._bar.add_task(description, total=total)

    def advance(self) -> None:
        if self._bar is not None:
            self._bar.advance(self._task)


def render(results: BenchResults, console) -> None:
    """The closed-loop table (rows per concurrency: ours, theirs, speedup) and the long
    prompt table."""
    engines = [OURS] + ([results.config["compare"]] if results.config.get("compare") else [])
    title = f"mlxserve bench: {results.config['model']} ({results.config['quantization']})" + (
        " (partial: interrupted)" if results.partial else "")
    shown = [e for engine in engines for e in results.entries(engine).values()]
    shown += [e for e in [*(results.long_prompt(engine) for engine in engines),
                          results.scenario(OURS, "prefix_reuse")] if e]
    if not shown:  # interrupted before a run was measured (in a warm-up run, say): no empty table
        console.print(f"{title}: no run was measured", highlight=False)
        return
    # Medians of the runs measured, which an interrupted bench has fewer of than it was asked
    # for, and not necessarily as many in every row: then each row says how many.
    counts = {len(e["runs"]) for e in shown}
    per_row = len(counts) > 1
    asked = results.config["runs"]
    if per_row:
        medians = f"medians of each row's measured runs (column 'runs'; {asked} asked for)"
    else:
        [measured] = counts
        medians = f"medians of {plural(measured, 'run')}" + (f" ({asked} asked for)" if measured != asked else "")
    caption = (f"{medians}; prompt {plural(results.config['prompt_tokens'], 'token')}, "
               f"{results.config['gen_tokens']:,} generated per request; prefill tok/s counts the prompt "
               f"tokens not taken from the prefix cache")
    if len(engines) > 1:
        caption += "; speedup > 1 means mlxserve is better (latency and memory: theirs/ours, throughput: ours/theirs)"
    speculative = results.config["engine"].get("speculative")
    if speculative:
        drafts = [f"C={c} {stats['accepted_tokens']:,} of {stats['drafted_tokens']:,}"
                  for c, e in results.entries(OURS).items() if (stats := e.get("engine_stats"))]
        caption += (f"; mlxserve speculates ({speculative}): draft tokens accepted in the last run, "
                    f"{', '.join(drafts) or 'none measured'}")
    keys = ["C", "requests", *(["runs"] if per_row else []), "engine"]
    rows: list[tuple[list[str], list[str], bool]] = []  # (row names, figures, last of its section)
    ratios = {r["concurrency"]: r for r in results.ratios().get("concurrency", [])}
    for concurrency in results.config["concurrency"]:
        section = []
        for engine in engines:
            entry = results.entries(engine).get(concurrency)
            if entry:
                section.append(([str(concurrency), str(entry["requests"]), *_runs_cell(entry, per_row), engine],
                                [f.format(entry["median"].get(f.key)) for f in CLOSED_LOOP_FIGURES]))
        if concurrency in ratios:
            section.append((["", "", *([""] if per_row else []), "speedup"],
                            [_format_speedup(ratios[concurrency][f.key]) for f in CLOSED_LOOP_FIGURES]))
        rows += [(names, figures, i == len(section) - 1) for i, (names, figures) in enumerate(section)]
    _print_tables(console, title, caption, keys, [f.label for f in CLOSED_LOOP_FIGURES], rows)
    if any(results.long_prompt(e) for e in engines):
        _print_long_prompt_table(results, engines, console, per_row)
    reuse = results.scenario(OURS, "prefix_reuse")
    if reuse:
        _print_tables(console, f"chat second turn after {plural(reuse['history_tokens'], 'token')} of history "
                               f"(+{results.config['gen_tokens']:,} answer, +{CHAT_FOLLOW_UP_TOKENS} follow-up)", None,
                      ["runs"] if per_row else [], [f.label for f in PREFIX_REUSE_FIGURES],
                      [(_runs_cell(reuse, per_row), [f.format(reuse["median"].get(f.key)) for f in PREFIX_REUSE_FIGURES],
                        False)])


def _print_tables(console, title: str, caption: str | None, keys: list[str], figures: list[str],
                  rows: list[tuple[list[str], list[str], bool]]) -> None:
    """A table of `rows` (their names under `keys`, their figures under `figures`, and whether
    a section ends after each), right-aligned. Where it is wider than the console (11 columns
    in a terminal of 80), rich would squeeze its columns, cutting names and figures short
    ("mlx…", "3,58…"): then the figures go into as many tables, one under the other, as it
    takes for each to fit, each with the rows' names."""
    from rich.table import Table
    from rich.text import Text

    def table(columns: list[int], first: bool, last: bool) -> Table:
        t = Table(title=Text(title, style="table.title") if first else None, caption=caption if last else None)
        for header in [*keys, *(figures[i] for i in columns)]:
            t.add_column(header, justify="right", no_wrap=True)
        for names, values, section_ends in rows:
            t.add_row(*names, *(values[i] for i in columns))
            if section_ends:
                t.add_section()
        return t

    unbounded = console.options.update(max_width=10**6)  # (measured against the console, it never exceeds it)
    groups: list[list[int]] = [[]]
    for i in range(len(figures)):
        if groups[-1] and console.measure(table([*groups[-1], i], False, False), options=unbounded).maximum > console.width:
            groups.append([])
        groups[-1].append(i)
    if len(groups) == 1:
        console.print(table(groups[0], True, True))
        return
    for n, columns in enumerate(groups):
        console.print(table(columns, n == 0, False))
    if caption:  # under them all, as wide as the console (the last table may be narrow)
        console.print(Text(caption, style="table.caption"))


def _runs_cell(entry: dict, per_row: bool) -> list[str]:
    return [str(len(entry["runs"]))] if per_row else []


def _print_long_prompt_table(results: BenchResults, engines: list[str], console, per_row: bool = False) -> None:
    streams = results.config["long_prompt_streams"]
    rows = []
    for engine in engines:
        entry = results.long_prompt(engine)
        if entry:
            rows.append(([engine, *_runs_cell(entry, per_row)],
                         [f.format(entry["median"].get(f.key)) for f in LONG_PROMPT_FIGURES], False))
    speedups = results.ratios().get("long_prompt")
    if speedups:
        rows.append((["speedup", *([""] if per_row else [])],
                     [_format_speedup(speedups[f.key]) for f in LONG_PROMPT_FIGURES], False))
    _print_tables(console, f"long prompt ({plural(results.config['long_prompt_tokens'], 'token')}) admitted while "
                           f"{plural(streams, 'stream')} {'decodes' if streams == 1 else 'decode'}",
                  "admission: from the long prompt's submit to its first token; stall = admission ITL p99 / steady ITL p50",
                  ["engine", *(["runs"] if per_row else [])], [f.label for f in LONG_PROMPT_FIGURES], rows)


def _format_speedup(value: float | None) -> str:
    return "–" if value is None else f"{value:.2f}×"


# ---- command line ---------------------------------------------------------------------------
def config_from_args(args) -> BenchConfig:
    cfg = BenchConfig(
        prompt_tokens=args.prompt_tokens,
        gen_tokens=args.gen_tokens,
        concurrency=parse_concurrency(args.concurrency),
        requests=args.requests,
        shared_prefix_tokens=args.shared_prefix_tokens,
        long_prompt_tokens=args.long_prompt_tokens,
        long_prompt_streams=args.long_prompt_streams,
        chat_history_tokens=args.chat_history_tokens,
        warmup=args.warmup,
        runs=args.runs,
        compare=args.compare,
        seed=args.seed,
        engine=_engine_config(args),
    )
    cfg.validate()
    if args.quantize is not None and args.random_weights is None:
        raise ValueError("--quantize applies to --random-weights (load a quantized checkpoint instead)")
    if getattr(args, "random_gguf", None) is not None:
        if args.random_weights is None:
            raise ValueError("--random-gguf applies to --random-weights (for a real file use --model FILE.gguf)")
        if args.quantize is not None:
            raise ValueError("--random-gguf and --quantize are different weights: give one of them")
    elif args.random_weights is not None and getattr(args, "gguf_mode", "exact") != "exact":
        raise ValueError("--gguf-mode applies to GGUF weights: add --random-gguf Q4_K_M")
    return cfg


def _engine_config(args) -> EngineConfig:
    """The engine's own defaults, except where a flag was given."""
    from .cli import engine_config

    given = {"max_batch_tokens": args.max_batch_tokens, "mixed_batch_tokens": args.mixed_batch_tokens,
             "block_size": args.block_size}
    return engine_config(args, **{k: v for k, v in given.items() if v is not None})


def load_for_bench(args) -> LoadedModel:
    if args.random_weights and getattr(args, "random_gguf", None):
        from .random_gguf import build_random_gguf_model

        return build_random_gguf_model(args.random_weights, args.random_gguf, mode=args.gguf_mode,
                                       dtype=args.dtype, seed=args.seed)
    if args.random_weights:
        from .random_weights import build_random_model

        return build_random_model(args.random_weights, dtype=args.dtype, quantize=args.quantize, seed=args.seed)
    from .loader import load_model, parse_dtype

    return load_model(args.model, dtype=parse_dtype(args.dtype), progress=True,
                      gguf_mode=getattr(args, "gguf_mode", "exact"))


def main(args) -> int:
    """`mlxserve bench`: validate, load, run, then print the table and write the JSON — also
    after Ctrl-C, with what was measured (exit status 130)."""
    from .cli import output_console

    cfg = config_from_args(args)
    if args.json:
        check_writable(args.json)  # before the run, not after it
    err = output_console(stderr=True)
    loaded = load_for_bench(args)
    cfg.validate_for(loaded)
    err.print(f"bench: {loaded.name} ({loaded.quantization}) ready in {loaded.load_seconds:.1f}s", highlight=False)
    results = BenchResults(describe_run(loaded, cfg, args.random_weights))
    status = 0
    try:
        with Progress(err) as progress:
            run_bench(loaded, cfg, results, progress)
    except KeyboardInterrupt:
        results.partial = True
        status = 130
        err.print("bench: interrupted; reporting what was measured", highlight=False)
    try:
        render(results, output_console())  # (off a terminal, logs: wide, not folded into 80 columns)
    except OSError:  # standard output failed (a full disk, a reader gone): the figures still go to --json
        if args.json:
            write_json(results, args.json, err)
        raise
    if args.json and not write_json(results, args.json, err):
        from .cli import EXIT_USAGE

        return EXIT_USAGE  # (its line is `mlxserve: error: …`, whose status is 2 everywhere else)
    return status


def write_json(results: BenchResults, path: str, err) -> bool:
    """Write the results to `path`, saying so on `err`; False (said there) if that failed."""
    import json

    try:
        with open(path, "w") as f:
            json.dump(results.to_json(), f, indent=2, default=str)
    except OSError as exc:  # the folder went away during the run
        err.print(f"mlxserve: error: --json {path}: {exc.strerror}", highlight=False)
        return False
    err.print(f"bench: wrote {path}", highlight=False)
    return True


def check_writable(path: str) -> None:
    """Raise ValueError (one line) unless a file can be written at `path`."""
    folder = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        raise ValueError(f"--json {path}: is a folder")
    if not os.path.isdir(folder):
        raise ValueError(f"--json {path}: the folder {folder} does not exist")
    if not os.access(path if os.path.exists(path) else folder, os.W_OK):
        raise ValueError(f"--json {path}: not writable")
    # os.access says yes to root for files that take no writing all the same (/proc/version):
    # open it, leaving what it holds as it is, and a file made for the test is removed again.
    existed = os.path.exists(path)
    try:
        with open(path, "a"):
            pass
    except OSError as exc:
        raise ValueError(f"--json {path}: not writable ({exc.strerror})") from None
    if not existed:
        os.remove(path)
