"""The step-driven scheduler: which rows run in the next forward pass, and what they feed.

Every request is a row. A row's sequence is its prompt followed by the tokens generated so
far; its cache holds the first `cache.length` of them. Whatever is not in the cache yet is
"unfed": one token for a decoding row (the token sampled last step), the rest of the prompt
for a prefilling row, everything for a row that was preempted and must recompute.

Each step:
  1. every decoding row feeds its one token;
  2. prefill chunks, oldest row first, take up to `mixed_batch_tokens` tokens (more beside
     many decoding rows, `max_batch_tokens` beside none: see `Scheduler._prefill_budget`);
  3. rows whose feed reaches the end of their sequence get logits and sample a token.
Rows join and leave between steps; nobody is re-prefilled because someone else arrived.
When KV memory is full, the youngest row is preempted (its slot freed, its tokens kept)
and recomputed later; nothing it produced is lost.

Speculation: a row with a drafter (spec/) feeds its next token followed by a draft of k
tokens, and samples after each of those k + 1 positions with the random keys decoding would
use (sampling.SamplingAhead). It keeps the draft's longest prefix that matches its own
samples, plus the sample after it, and rolls the rest back: attention K/V is trimmed; a
hybrid model's recurrent state goes back to its snapshot from before the step, and the
accepted tokens are fed again with the next step's (Scheduler._accept_draft). A DFlash
drafter (spec/dflash.py) drafts from the target's hidden states: every step hands each such
row the ones its feed produced (StepBatch.captured), and the drafts of a step's rows are
computed together, in one forward pass of the draft model, before the step is queued.
"""

from __future__ import annotations

import itertools
import time
from collections import deque
from dataclasses import dataclass, field

import mlx.core as mx
from rich.filesize import decimal as human_size

from .batch import on_cuda
from .cache import GrowthPending, KVStore, OutOfKVMemory, RowCache, Snapshot, state_arrays
from .detokenizer import IncrementalDetokenizer, StopMatcher
from .grammar import Grammars
from .prefix_cache import Match, PrefixCache, PrefixStats, common_prefix_length
from .runner import Feed, Runner
from .sampling import RowSamplingState, SampleResult, Sampler, SamplingParams
from .spec import default_draft_tokens, make_drafter, resolve_drafts

_request_counter = itertools.count()

# Next to decoding rows, a chunk deep into a long prompt costs the device more per token (its
# queries attend over more keys), and the decoding rows wait for it. Beyond this many keys
# the chunk shrinks in proportion, so a step's attention work (chunk tokens x keys) stays about
# what a full chunk costs at this depth.
FULL_CHUNK_KEYS = 4096

# Prefill tokens of a step in which no row decodes, on a GPU (SchedulerConfig's
# max_batch_tokens). H100, Qwen3-0.6B, one prompt alone (docs/performance-history.md, session
# 35): 4,096 tokens to the first token in 86.6 ms with 512-token steps, 36.5 ms with 2,048,
# 36.6 with 4,096; 16,384 tokens in 423.7, 201.6 and 195.9 ms (mlx-lm, 2,048 a step: 56.2
# and 213.5 ms). Qwen3.5-0.8B (session 36), once its kernels were compiled: 4,096 tokens in
# 110.8 ms with 2,048-token steps against 183.7 with 512.
GPU_MAX_BATCH_TOKENS = 2048

# The most steps a speculating row decodes without drafting after drafts that failed.
MAX_DRAFT_BACKOFF = 16


# See Scheduler._copies_are_cheap.
QUEUE_WITHOUT_WAIT_BYTES = 1 << 30


class _ZerosDrafter:
    """Drafts token 0 (see Scheduler.warm_up)."""

    @staticmethod
    def propose(tokens: list[int], k: int) -> list[int]:
        return [0] * k


class ServerBusy(RuntimeError):
    """The waiting queue is full."""


@dataclass
class Request:
    prompt_ids: list[int]
    params: SamplingParams = field(default_factory=SamplingParams)
    id: str = field(default_factory=lambda: f"req-{next(_request_counter)}")
    # Score the prompt: the log-prob of every prompt token after the first, with this many
    # top alternatives (the final event carries them). score_only: generate nothing.
    prompt_logprobs: int | None = None
    score_only: bool = False
    # An embedding: the final hidden state (after the model's last norm) at the prompt's last
    # position, in float32, on the final event (TokenEvent.embedding). Generates nothing.
    embed: bool = False

    def __post_init__(self):
        if self.embed:
            self.score_only = True


@dataclass
class TokenLogprob:
    token_id: int
    logprob: float
    top: list[tuple[int, float]]


@dataclass
class TokenEvent:
    """What a request produced in one step. The last event has `finish_reason` set."""

    request_id: str
    token_ids: list[int]
    text: str
    logprobs: list[TokenLogprob] | None = None
    finish_reason: str | None = None  # "stop" | "length" | "cancelled" | "error"
    error: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    ttft_s: float | None = None
    decode_tok_s: float | None = None
    time: float = 0.0  # time.perf_counter() when the engine produced the event
    prompt_logprobs: list[TokenLogprob | None] | None = None  # on the final event, if asked for
    embedding: list[float] | None = None  # on the final event of an embedding request (Request.embed)


@dataclass
class SchedulerConfig:
    # Prefill tokens of a step in which no row decodes (decoding rows add one token each on
    # top of a step's budget). None: GPU_MAX_BATCH_TOKENS on a GPU, where nobody waits on
    # such a step but the prompts in it and its host cost hardly grows with its tokens;
    # mixed_batch_tokens on the CPU, where bigger steps were slower (tiny-256, a 2,063-token
    # prompt alone: 5,366 ms to the first token in 2,048-token steps against 4,170 in
    # 512-token ones; a bigger chunk computes more of the attention scores its causal mask
    # hides).
    max_batch_tokens: int | None = None
    # Prefill tokens of a step beside up to budget_rows decoding rows (at most
    # max_batch_tokens), which wait for it. On an H200 with Qwen3-0.6B
    # (docs/performance-history.md), 2048 instead of 512 raised a 16k-token prompt's stall of
    # 8 decoding streams from 2.96x to 5.34x their steady ITL and changed throughput at 32
    # and 64 streams by -10% and +3% (single runs).
    mixed_batch_tokens: int = 512
    # ...for a step with up to this many decoding rows; with more, the prefill budget grows in
    # proportion (see Scheduler._prefill_budget).
    budget_rows: int = 32
    max_running: int = 64
    max_waiting: int = 256
    block_size: int = 64
    context_length: int = 4096  # the engine sets the model's
    prefix_cache: bool = True
    # Speculative decoding: a drafter from spec.DRAFTERS (None: off), and the most draft tokens
    # a row verifies in one step (None: the drafter's default, spec.default_draft_tokens).
    speculative: str | None = None
    draft_tokens: int | None = None
    # A DFlash draft: its checkpoint (folder, alias or Hugging Face repo id), or "random" (a
    # random draft at the target's shape, for benchmarks).
    draft_model: str | None = None

    def __post_init__(self):
        if self.max_batch_tokens is None:
            on_gpu = mx.default_device() == mx.gpu
            self.max_batch_tokens = GPU_MAX_BATCH_TOKENS if on_gpu else self.mixed_batch_tokens

    @property
    def decoding_batch_tokens(self) -> int:
        """Prefill tokens of a step beside up to `budget_rows` decoding rows."""
        return min(self.mixed_batch_tokens, self.max_batch_tokens)

    @property
    def request_limit(self) -> int:
        """Requests held at once, running and waiting: beyond it a new one is "server busy"."""
        return self.max_running + self.max_waiting


class Row:
    """A request inside the scheduler."""

    def __init__(self, request: Request, cache: RowCache, eos_ids: frozenset[int], decode, arrival: float,
                 constraint=None):
        self.request = request
        self.params = request.params
        self.cache = cache
        self.prompt_len = len(request.prompt_ids)
        self.tokens: list[int] = list(request.prompt_ids)  # prompt + generated
        self.sampling = RowSamplingState(request.params, request.prompt_ids, constraint)
        self.detokenizer = IncrementalDetokenizer(decode, prompt_tail=request.prompt_ids[-4:])
        self.stops = StopMatcher(request.params.stop)
        stop_ids = set(request.params.stop_token_ids)
        if not request.params.ignore_eos or constraint is not None:
            # (A grammar allows an end-of-turn token only where the answer is complete: there
            # it ends the answer, ignore_eos or not.)
            stop_ids |= eos_ids
        self.stop_ids = frozenset(stop_ids)
        self.arrival = arrival
        self.first_token_time: float | None = None
        self.cached_tokens = 0
        self.prompt_counted = 0  # prompt positions counted as prefilled (stats): a recompute is not again
        # Prompt tokens the device is known to have computed (the prefix cache's included),
        # for Scheduler.prompt_progress: only the stepping thread writes it, and only with a
        # count it has waited for, so a reader in another thread never sees it ahead.
        self.prompt_read = 0
        self.admitted = False  # once admitted, a preempted row's return is a recompute
        self.finished = False
        # Tokens sampled on the device whose values the host has not read yet (steps are
        # pipelined): at most one per step in flight.
        self.pending = 0
        self.pending_index: int | None = None  # its index in the newest step's samples
        # Alone, it has grown as far as the memory budget allows, with a token still in flight:
        # it ends ("length") when the same step reads that token back (Scheduler._reserve
        # leaves it out of the step's plan; its token is in the step in flight, always read
        # back before step() returns).
        self.out_of_room = False
        # Preempted because, alone, it could not hold its slot and a bigger one at once: it
        # comes back in a fresh slot (no prefix match to take over) and recomputes.
        self.fresh_slot = False
        # Prompt scoring: entry i is the log-prob of prompt token i (None for the first).
        self.prompt_scores: list[TokenLogprob | None] | None = [None] if request.prompt_logprobs is not None else None
        # Speculative decoding (see the module docstring): the row's drafter (None: it does
        # not speculate), the draft its feed of this step carries, and, for a hybrid model,
        # its cache as it was before that feed (recurrent state cannot be trimmed).
        self.drafter = None
        self.draft: list[int] = []
        self.before_draft: Snapshot | None = None
        # Steps to decode without drafting after drafts that came to nothing, doubling with
        # each miss in a row (see Scheduler._draft).
        self.draft_misses = 0
        self.draft_backoff = 0

    @property
    def id(self) -> str:
        return self.request.id

    @property
    def num_generated(self) -> int:
        return len(self.tokens) - self.prompt_len

    @property
    def total(self) -> int:
        """Sequence length including pending tokens."""
        return len(self.tokens) + self.pending

    @property
    def unfed(self) -> int:
        return self.total - self.cache.length

    @property
    def is_decoding(self) -> bool:
        return self.unfed == 1 and self.num_generated + self.pending > 0

    @property
    def wants_draft(self) -> bool:
        """Whether the row drafts in its next step (so its tokens must be known by then)."""
        return self.drafter is not None and not self.draft_backoff

    @property
    def needs_more(self) -> bool:
        """Whether the row has anything left to feed: its prompt, or tokens to generate (False
        once the tokens in flight already reach max_tokens)."""
        if self.request.score_only:
            return self.cache.length < self.prompt_len
        return self.num_generated + self.pending < self.params.max_tokens


@dataclass
class InFlight:
    """A step whose samples are still being computed on the device."""

    result: SampleResult
    rows: list[Row]
    indices: list[int | None]  # per row: the placeholder index in its sampling state (None: verifying a draft)
    offsets: list[int]  # per row: its first sample in `result` (a verifying row has one per draft token, plus one)
    # per row: whether the step counted its sample as decoded (Scheduler._step_counts: all but
    # a row's first token); one that reaches no answer is taken back (_read_back)
    decoded: list[bool] = field(default_factory=list)


def check_fits(prompt_tokens: int, context_length: int) -> None:
    """Raise ValueError unless a prompt fits in the model's context."""
    if prompt_tokens > context_length:
        raise ValueError(f"the prompt has {prompt_tokens:,} tokens, more than the model's context of "
                         f"{context_length:,}")  # (separated as the CLI's counts: `run` says it)


class PromptExceedsMemory(ValueError):
    """A prompt whose KV cannot fit the memory budget even with nothing else running."""


def check_memory(prompt_tokens: int, kv: KVStore) -> None:
    """Raise PromptExceedsMemory unless a prompt's slot fits the KV budget on its own."""
    if not kv.fits_alone(prompt_tokens):
        raise PromptExceedsMemory(
            f"the prompt has {prompt_tokens:,} tokens, whose KV cache needs {human_size(kv.slot_bytes_for(prompt_tokens))}; "
            f"{kv.budget_text} (--memory-budget)")


class Scheduler:
    def __init__(self, runner: Runner, tokenizer, config: SchedulerConfig, draft=None, grammars: Grammars | None = None):
        """`draft`: the DFlash draft model (spec.dflash.DFlashDraft) when config.speculative
        is "dflash"; the runner must then capture its target layers. `grammars`: where
        constrained requests' grammars are compiled (the engine shares its own with the front
        ends, which check grammars before submitting them)."""
        self.runner = runner
        self.kv: KVStore = runner.kv
        self.tokenizer = tokenizer
        self.config = config
        self.sampler = Sampler()
        self.grammars = grammars or Grammars(tokenizer)
        self.waiting: deque[Row] = deque()
        self.running: list[Row] = []  # admission order: oldest first
        self.eos_ids = frozenset(tokenizer.eos_token_ids)
        self.prefix = PrefixCache(self.kv) if config.prefix_cache else None
        self.stats = SchedulerStats()
        self._events: list[TokenEvent] = []  # produced outside a row's own commit (errors)
        self._inflight: InFlight | None = None
        self._queued = False  # work queued on the device since the last _wait_for_device
        self._queue_without_wait = on_cuda()  # see _copies_are_cheap
        # A hybrid model (Qwen3.5) keeps per-row recurrent state beside the KV.
        self.hybrid = self.kv.state_bytes_per_row > 0
        self.draft = draft
        self._lazy_drafts: list[Row] = []  # rows whose draft of this step a draft model computes (_plan)
        # DFlash: finished rows' draft contexts, for later rows that start the same way. They
        # share the memory the KV budget left to draft contexts: as many positions as it
        # holds tokens (see engine.make_scheduler).
        self.draft_contexts = None
        if draft is not None:
            from .spec.dflash import DraftContexts

            self.draft_contexts = DraftContexts(self.kv.max_bytes // self.kv.bytes_per_token)
        self.draft_tokens = (config.draft_tokens or default_draft_tokens(config.speculative, draft)
                             if config.speculative else 0)

    def warm_up(self) -> None:
        """Run a two-token request through a prefill and a decode step before any real one,
        so that compiled functions and kernels are built at start-up, not during the first
        answer; with speculation on, a step verifying a whole draft too (with a draft model,
        one of its drafts as well). (On the CPU back-end
        that build runs the C++ compiler through system(), which ignores Ctrl-C while it
        runs.) What it leaves in the prefix cache (a whole block, where blocks are small
        and drafts long) is dropped: its memory is the requests'."""
        k = self.draft_tokens
        self.add(Request([0, 0], SamplingParams(max_tokens=2 + k, temperature=0.0, ignore_eos=True), id="warm-up"))
        if k and self.draft is None:
            # ...and a step verifying a whole draft (and rolling it back, unless the model
            # happens to agree), the shape a speculating single stream has. (A draft model's
            # first draft always has k tokens: the row keeps its own drafter.)
            self.waiting[-1].drafter = _ZerosDrafter()
        while self.has_work():
            self.step()
        self.stats = SchedulerStats()
        if self.prefix is not None:
            self.prefix.clear()
            self.prefix.stats = PrefixStats()  # its lookup is not a request anyone made
        if self.draft_contexts is not None:
            self.draft_contexts.clear()  # (nor is its draft context anyone's)

    # ---- requests in and out ---------------------------------------------------------
    def add(self, request: Request) -> None:
        check_fits(len(request.prompt_ids), self.config.context_length)
        check_memory(len(request.prompt_ids), self.kv)
        limit = self.config.request_limit
        if len(self.waiting) + len(self.running) >= limit:
            raise ServerBusy(f"server busy: {len(self.waiting) + len(self.running)} requests in progress (limit {limit})")
        grammar = request.params.grammar
        constraint = self.grammars.constraint(grammar) if grammar and not request.score_only else None
        row = Row(request, RowCache(self.kv), self.eos_ids, self.tokenizer.decode, time.perf_counter(), constraint)
        if (self.config.speculative and not request.params.has_penalties and constraint is None
                and request.prompt_logprobs is None and not request.score_only):
            # (Penalties and a grammar's masks depend on every token before the one drawn,
            # drafts included.)
            row.drafter = make_drafter(self.config.speculative, self.draft, self.kv.capacity_for)
        self.waiting.append(row)

    def cancel(self, request_id: str) -> TokenEvent | None:
        """Drop a request wherever it is; its slot is free when this returns."""
        for row in list(self.waiting) + self.running:
            if row.id == request_id:
                return self._finish(row, "cancelled")
        return None

    def has_work(self) -> bool:
        return bool(self.waiting or self.running or self._inflight)

    def prompt_progress(self, request_id: str) -> tuple[int, int] | None:
        """(prompt tokens read, prompt tokens) of a request until its first token comes, also
        while its last chunk is computed (a prompt of one chunk shows 0 read); None once the
        first token came, or for a request not here. The prefix cache's tokens and a chunk
        count as read once the step after the one that fed them has waited for the device
        (Row.prompt_read): a 512-token chunk takes a minute on a CPU, and the figure must not
        run ahead of it. Front ends call it from their own thread while the engine thread
        steps: the row lists are copied whole (one C call, under the GIL) and the figure is
        one integer the engine thread publishes, so it may be a step old, never ahead."""
        for row in list(self.running) + list(self.waiting):
            if row.id == request_id:
                return None if row.num_generated else (row.prompt_read, row.prompt_len)
        return None

    # ---- one step ---------------------------------------------------------------------
    def step(self) -> list[TokenEvent]:
        """Plan and queue one forward pass, then read back the previous one.

        Steps are pipelined: the host builds step N's graph while the device computes step
        N-1, and turns step N-1's samples into text and events while the device computes
        step N; decode rows of step N take their input token straight from step N-1's
        samples on the device. A step in which no row decodes (its samples are first tokens)
        or with a row whose sampling depends on its history (penalties) is read back at once
        instead.

        Step N is queued only once the device has finished everything queued before it
        (`_wait_for_device`): MLX writes an array in place only when no queued kernel still
        reads it, so a step queued while the previous one runs would copy every K/V shelf
        it writes into (a whole layer's shelf per layer per step) instead of writing a few
        positions. Where those copies are small and the device fast (`_copies_are_cheap`),
        the step is queued at once instead.
        """
        started = time.perf_counter()
        self._admit()
        feeds, rows, reading = self._plan()
        if self.draft_contexts is not None and self.draft_contexts.entries:
            # Running rows' draft contexts grew (as they drafted): kept ones make way, oldest first.
            self.draft_contexts.fit(self.draft_contexts.max_positions - self._draft_buffers())
        events, self._events = self._events, []
        decode = sum(1 for row in rows if row.is_decoding)
        prompt_tokens, generated = self._step_counts(feeds, rows)
        outputs, queued = self._launch(feeds, rows) if feeds else ([], None)
        self._wait_for_device(self._copies_are_cheap(decode, rows))
        # The device has computed everything fed before this step (a step that skips the wait
        # feeds no prompt): what prompt_progress shows.
        for row, start in reading:
            row.prompt_read = start
        if outputs:
            mx.async_eval(outputs)
            self._queued = True
        if self._inflight is not None:
            events += self._read_back(self._inflight)
        self._inflight = queued
        if queued is not None and (not decode or any(row.params.has_penalties or row.sampling.constraint is not None
                                                     or row.draft or row.wants_draft for row in queued.rows)):
            # First tokens only: waiting for them now costs little overlap (no stream is
            # decoding), while pipelining would hold them back until the next step is built.
            # A row verifying a draft commits what it accepted now, and a row that may draft
            # next drafts from its tokens, which must be known before the next step is planned;
            # so must a penalised or constrained row's, whose next draw depends on them.
            events += self._read_back(queued)
            self._inflight = None
        self.stats.record_step(prefill=prompt_tokens, decode=generated, seconds=time.perf_counter() - started)
        events += self._events  # e.g. scoring requests that finished in this step
        self._events = []
        return events

    def _draft_buffers(self, leaving: Row | None = None) -> int:
        """Entries the running rows' draft contexts hold (but `leaving`'s)."""
        return sum(r.drafter.capacity for r in self.running if r is not leaving and hasattr(r.drafter, "capacity"))

    @staticmethod
    def _step_counts(feeds: list[Feed], rows: list[Row]) -> tuple[int, int]:
        """(prompt tokens fed, tokens the step generates) for the stats. Tokens fed again (a
        preempted row's recompute, a hybrid row's accepted draft) count once, the first time,
        and a draft's accepted tokens as they are accepted (SchedulerStats.record_draft)."""
        prompt = generated = 0
        for feed, row in zip(feeds, rows):
            end = min(feed.start + len(feed.tokens), row.prompt_len)
            prompt += max(0, end - max(feed.start, row.prompt_counted))
            row.prompt_counted = max(row.prompt_counted, end)
            ends = feed.start + len(feed.tokens) - len(row.draft) == row.total
            if ends and row.num_generated + row.pending and not row.request.score_only:
                generated += 1  # (a row's first token is its prompt's: TTFT, not decoding)
        return prompt, generated

    def _wait_for_device(self, skip: bool = False) -> None:
        """Block until the device has run everything queued so far, so that MLX has let go
        of the buffers those kernels read (on its CUDA back-end `mx.synchronize` waits for
        exactly that) and the next step writes the K/V shelves in place. `skip`: queue the
        next step at once (the work stays counted as queued: a later wait waits for it)."""
        if self._queued and not skip:
            mx.synchronize()
            self._queued = False

    def _copies_are_cheap(self, decode: int, rows: list[Row]) -> bool:
        """Whether to queue this step without waiting for the previous one, and let MLX copy
        the K/V shelves it writes: on CUDA, for a step of decoding rows only, while every
        shelf together holds at most QUEUE_WITHOUT_WAIT_BYTES. Measured on an H200 with
        Qwen3-4B 4-bit, one stream, 512-token prompts, the shelves reaching 0.64 GB: 177.4
        tok/s queued at once against 157.7 waiting (docs/performance-history.md). Elsewhere,
        and for larger shelves, no such measurement: a step waits, as it always did."""
        return (self._queue_without_wait and decode == len(rows) > 0
                and self.kv.bytes_allocated <= QUEUE_WITHOUT_WAIT_BYTES)

    def _launch(self, feeds: list[Feed], rows: list[Row]) -> tuple[list[mx.array], InFlight | None]:
        """Build a step's graph (lazily): the arrays to evaluate, and the samples to read
        back if any row samples."""
        previous = self._inflight.result.tokens if self._inflight is not None else None
        if self.hybrid:
            for row in rows:
                if row.draft:  # (before the forward pass hands the row's state to the step's batch)
                    row.before_draft = row.cache.snapshot()
        logits, batch = self.runner.forward(feeds, previous)
        kept: list[mx.array] = []
        captured = [batch.captured] if batch.captured is not None else []
        for row, feed in zip(rows, feeds):
            if captured and hasattr(row.drafter, "observe"):
                first = batch.row_offsets[feed.key]
                row.drafter.observe(feed.start, batch.captured[first : first + len(feed.tokens)])
            row.cache.extend(len(feed.tokens))
            if self.hybrid:
                kept += self._keep_state(row)
            if len(feed.tokens) > 1 or feed.from_previous is None:
                self._remember(row)
        states = state_arrays([row.cache for row in rows]) + kept if self.hybrid else []
        states += captured  # evaluated with the step: the drafts read them after it
        # Logits come in the batch's flat order (rows grouped by token count).
        by_id = {row.id: row for row in rows}
        feed_of = {feed.key: feed for feed in feeds}
        sampling_rows, offsets = [], []  # rows that sample, and each one's first sample
        last_rows, samplers = [], []  # per sample: its logits row and its sampling state
        for key, first, count in batch.row_logits:
            if not count:
                continue
            row, feed = by_id[key], feed_of[key]
            if row.draft:
                # The row's next token and its draft: sample after each of the last k + 1
                # positions, drawing as decoding would (token i + t with key i + t).
                sampling_rows.append(row)
                offsets.append(len(last_rows))
                last_rows += range(first, first + count)
                samplers += [row.sampling.ahead(i) for i in range(count)]
                continue
            if feed.logits == "all":
                self._score_prompt(row, feed, logits[first : first + count])
            if feed.start + len(feed.tokens) == row.total and not row.request.score_only:
                sampling_rows.append(row)
                offsets.append(len(last_rows))
                last_rows.append(first + count - 1)
                samplers.append(row.sampling)
            elif row.request.score_only and row.cache.length >= row.prompt_len:
                embedding = None
                if row.request.embed:
                    # Read back at once, like a prompt's scores (see _score_prompt).
                    embedding = batch.hidden[first + count - 1].astype(mx.float32).tolist()
                # (An embedding is whole: "stop". A prompt's scores end where asked: "length".)
                self._events.append(self._finish(row, "stop" if embedding is not None else "length", embedding=embedding))
        if sampling_rows and len(last_rows) != logits.shape[0]:
            logits = logits[mx.array(last_rows)]
        if not sampling_rows:
            return self.kv.arrays() + states, None  # a prefill-only step writes state only
        result = self.sampler.sample(logits, samplers)
        indices: list[int | None] = []
        decoded: list[bool] = []
        for row, offset in zip(sampling_rows, offsets):
            decoded.append(bool(row.num_generated + row.pending))  # as _step_counts counted it
            if row.draft:
                indices.append(None)  # its tokens are recorded as they are accepted
                continue
            row.pending += 1
            row.pending_index = offset
            indices.append(row.sampling.record_pending())
        outputs = [a for a in (result.tokens, result.logprobs, result.top_ids, result.top_logprobs) if a is not None]
        return outputs + states, InFlight(result, sampling_rows, indices, offsets, decoded)

    def _score_prompt(self, row: Row, feed: Feed, logits: mx.array) -> None:
        """Log-probs of the prompt tokens that follow each fed position (read back at once:
        scoring requests are rare and want every number)."""
        # A preempted row recomputes positions it has scored already: score the rest.
        first = max(feed.start + 1, len(row.prompt_scores))
        nxt = row.tokens[first : min(feed.start + len(feed.tokens) + 1, row.prompt_len)]
        if not nxt:
            return
        logits = logits[first - feed.start - 1 :]
        logprobs = logits[: len(nxt)].astype(mx.float32)
        logprobs = logprobs - mx.logsumexp(logprobs, axis=-1, keepdims=True)
        chosen = mx.take_along_axis(logprobs, mx.array(nxt)[:, None], axis=-1)[:, 0]
        k = row.request.prompt_logprobs
        top_ids = mx.argsort(-logprobs, axis=-1)[:, :k] if k else None
        top_vals = mx.take_along_axis(logprobs, top_ids, axis=-1) if k else None
        mx.eval([a for a in (chosen, top_ids, top_vals) if a is not None])
        chosen = chosen.tolist()
        tops = list(zip(top_ids.tolist(), top_vals.tolist())) if k else [([], [])] * len(nxt)
        for token, lp, (ids, vals) in zip(nxt, chosen, tops):
            row.prompt_scores.append(TokenLogprob(token, lp, list(zip(ids, vals))))

    def _read_back(self, step: InFlight) -> list[TokenEvent]:
        """Wait for a step's samples and commit them to their rows."""
        result = step.result
        tokens = result.tokens.tolist()
        chosen_lp = result.logprobs.tolist() if result.logprobs is not None else None
        top_ids = result.top_ids.tolist() if result.top_ids is not None else None
        top_lp = result.top_logprobs.tolist() if result.top_logprobs is not None else None
        now = time.perf_counter()
        events = []

        def logprob(row: Row, i: int) -> TokenLogprob | None:
            if not row.params.logprobs or chosen_lp is None:
                return None
            k = row.params.top_logprobs
            top = list(zip(top_ids[i][:k], top_lp[i][:k])) if top_ids is not None else []
            return TokenLogprob(tokens[i], chosen_lp[i], top)

        for row, index, i, decoded in zip(step.rows, step.indices, step.offsets, step.decoded):
            if index is None:
                events += self._accept_draft(row, tokens[i : i + len(row.draft) + 1], i, logprob, now)
                continue
            row.pending -= 1
            if row.finished:  # cancelled or stopped while this step was in flight
                if decoded:
                    # The step counted this token as decoded, but it is no part of the answer
                    # (the token before it was a stop, or the row ended meanwhile): taken back,
                    # as draft tokens after a stop are never counted (_accept_draft).
                    self.stats.take_back_decoded()
                continue
            row.sampling.fill(index, tokens[i])
            events.append(self._commit(row, tokens[i], logprob(row, i), now))
            if row.out_of_room and not row.finished:
                events.append(self._finish_flushed(row, "length", now=now))
        return events

    def _accept_draft(self, row: Row, samples: list[int], first: int, logprob, now: float) -> list[TokenEvent]:
        """Keep the longest prefix of the row's draft that the target sampled itself, and its
        own next token after it; roll the rest back. samples[i] is what the target drew
        after the row's next token and the draft's first i tokens."""
        draft, row.draft = row.draft, []
        if row.finished:
            return []
        accepted = 0
        while accepted < len(draft) and samples[accepted] == draft[accepted]:
            accepted += 1
        if accepted:
            row.draft_misses = 0
        else:
            self._draft_missed(row)
        rejected = len(draft) - accepted
        if rejected:
            if row.before_draft is not None:
                # Recurrent state holds every fed token: go back to before the feed; the
                # accepted tokens are fed again with the next step's.
                row.cache.restore(row.before_draft)
            else:
                row.cache.trim(rejected)
        row.before_draft = None
        events = []
        for i, token in enumerate(samples[: accepted + 1]):
            row.sampling.record(token)
            events.append(self._commit(row, token, logprob(row, first + i), now))
            if row.finished:
                break
        # Counted as they reach the answer: draft tokens after a stop (a stop token or string,
        # EOS) inside the draft were accepted by the target but are no part of it. (The step
        # counted its first token as decoded.)
        self.stats.record_draft(len(draft), min(accepted, len(events)), decoded=len(events) - 1)
        return events

    # ---- admission and planning ----------------------------------------------------------
    def _admit(self) -> None:
        try:
            self._admit_in_order()
        finally:
            self.kv.end_admission()

    def _admit_in_order(self) -> None:
        while self.waiting and len(self.running) < self.config.max_running:
            row = self.waiting[0]
            # Admission by memory: a slot for the whole prompt must fit without preempting
            # anyone. It is reserved now, so the row never moves during its prefill.
            match = self._lookup(row)
            if self._shares_blocks_in_progress(row, match.length):
                break
            try:
                if match.length:
                    self.prefix.adopt(row.cache, match)
                row.cache.reserve(row.unfed, may_wait=True)
            except GrowthPending:
                # Its shelf grows a share per step (cache.GROWTH_BYTES_PER_STEP): the rows
                # decoding meanwhile are not held up for the whole allocation at once.
                self._release(row)
                break
            except OutOfKVMemory:
                self._release(row)  # a taken-over slot goes back to the prefix cache
                if not self.running and self._inflight is None:
                    if match.length and not row.fresh_slot:
                        # Alone, the matched slot and the room the rest needs do not fit side
                        # by side: try a fresh slot, recomputing the prefix (as without a cache).
                        row.fresh_slot = True
                        continue
                    # Nothing will ever free memory for it: it can never fit. (Prompts are
                    # checked at submit, so this is a preempted row grown past the budget:
                    # it ends where it got to.)
                    if row.num_generated:
                        self._events.append(self._finish_flushed(row, "length"))
                    else:
                        self._events.append(self._finish(row, "error", "prompt does not fit in the KV memory budget"))
                    continue
                break
            row.fresh_slot = False
            self.waiting.popleft()
            if match.length and self.draft_contexts is not None and getattr(row.drafter, "capacity", None) == 0:
                # The matched prefix is not computed again: its draft context comes from an
                # earlier row's, if one is kept.
                self.draft_contexts.seed(row.drafter, row.tokens)
            if not row.prompt_counted:
                # The prompt positions its prefill skips: this admission's match, also for a row
                # preempted before it fed anything (an earlier admission's match reused nothing).
                # The stats count the request's lookup once, with the match that counted.
                if self.prefix is not None and row.prompt_scores is None:
                    self.prefix.record(0 if row.admitted else len(row.tokens), match.length - row.cached_tokens)
                row.cached_tokens = match.length
            row.admitted = True  # from now on, an admission is a recompute
            self.running.append(row)

    def _shares_blocks_in_progress(self, row: Row, matched: int) -> bool:
        """Whether a running row is still prefilling whole blocks of `row`'s prompt that the
        prefix cache does not have yet (it has `matched` tokens): the same prompt sent for n
        choices, or requests with a long common beginning sent together. `row` then waits
        until those blocks are computed and copies them, rather than computing them again
        beside the other row. (Prefill goes to the oldest rows first, so behind a prompt
        longer than a step's budget the rows would have waited anyway; behind a shorter one
        they, and the rows queued after them, lose a step or two.)"""
        if not self._may_reuse(row):
            return False
        bs = self.config.block_size
        reusable = (len(row.tokens) - 1) // bs  # blocks a match may cover (one token stays unfed)
        candidate = row.tokens[: reusable * bs]
        for other in self.running:
            if other.cache.length >= other.prompt_len:
                continue  # its prompt's blocks are computed: the match has what they share
            shared = common_prefix_length(candidate, other.tokens) // bs
            if self.hybrid:
                # A match must end on a recurrent snapshot, and a prefilling row keeps one at
                # its prompt's last full block only (_keep_state): worth waiting for if shared.
                last = (other.prompt_len - 1) // bs
                shared = last if shared >= last else 0
            if shared * bs > max(matched, other.cache.length):
                return True
        return False

    def _may_reuse(self, row: Row) -> bool:
        """Whether `row` may start from positions computed for other rows: not without a
        prefix cache, not when scoring its prompt (every position is needed), not in a fresh
        slot (see Row.fresh_slot)."""
        return self.prefix is not None and row.prompt_scores is None and not row.fresh_slot

    def _lookup(self, row: Row) -> Match:
        if not self._may_reuse(row):
            return Match(None, 0)
        return self.prefix.match(row.tokens, need_state=self.hybrid)

    def _keep_state(self, row: Row) -> list[mx.array]:
        """Hybrid models: when a row's length reaches a block boundary, snapshot its
        recurrent state there, so that the prefix cache can start a later request at that
        block (recurrent state cannot be rebuilt from KV). A row keeps two snapshots: the
        last one within its prompt (a repeated or extended prompt, a chat's next turn) and
        the newest one (a preempted row coming back). Returns the new snapshot's arrays, to
        be evaluated with the step."""
        cache, unit = row.cache, self.config.block_size
        if self.prefix is None or not cache.length or cache.length % unit:
            return []
        block = cache.length // unit - 1
        in_prompt = sorted(i for i in cache.states if (i + 1) * unit <= row.prompt_len - 1)
        keep = {i: cache.states[i] for i in in_prompt[-1:]}
        # A copy, evaluated with the step: the row's live state is a view into its group's
        # batched state, and a view (or a copy not yet computed) would keep that whole batch
        # alive for as long as the snapshot lives.
        keep[block] = {i: (window * 1, state * 1) for i, (window, state) in cache.recurrent.items()}
        cache.states = keep
        return [a for pair in keep[block].values() for a in pair]

    def _remember(self, row: Row) -> None:
        """Offer the row's computed full blocks to the prefix cache (only tokens whose values
        the host knows: a fed token may still be pending)."""
        if self.prefix is not None:
            self.prefix.insert(row.tokens, row.cache, min(row.cache.length, len(row.tokens)))

    def _release(self, row: Row) -> None:
        """The row gives its slot up: to the prefix cache if it holds reusable blocks."""
        if self.prefix is not None:
            self.prefix.release(row.cache, row.tokens)
        else:
            row.cache.release()

    def _plan(self) -> tuple[list[Feed], list[Row], list[tuple[Row, int]]]:
        """The step's feeds and their rows, and (row, where its feed starts) of the rows fed
        part of their prompt (for prompt_progress: only these, not every decoding row)."""
        plan: list[tuple[Row, int]] = []
        # A decoding row stops short of the context (its next token would lie past it); a
        # prompt as long as the context is still prefilled (and gets its one token).
        active = [r for r in self.running
                  if r.needs_more and (r.total < self.config.context_length or not r.is_decoding)]
        # Every decoding row feeds its one token. The budget bounds the prefill tokens on top:
        # counting decode tokens in it would cut a budget-sized prompt in two (next to 8
        # decoding rows, a 512-token prompt went in chunks of 256 and 128 and 64...), while
        # a decode token costs the device about nothing next to a chunk's token.
        self._lazy_drafts = []
        plan += [(row, 1 + self._draft(row)) for row in active if row.is_decoding]
        decoding = bool(plan)
        budget = full_budget = self._prefill_budget(len(plan))
        unit = self.config.block_size
        chunks = 0
        for row in active:  # prefill chunks, oldest first
            if row.is_decoding or budget <= 0:
                continue
            n = min(row.unfed, budget)
            keys = row.cache.length + n
            if decoding and keys > FULL_CHUNK_KEYS:
                n = min(n, max(unit, full_budget * FULL_CHUNK_KEYS // keys))
            if n < row.unfed and n < unit and chunks:
                # The budget's leftover would leave an odd-sized rest of this prompt (one
                # more attention group now, odd shapes later): it waits for the next step.
                continue
            if n < row.unfed and n >= unit:
                # Cut chunks to a block times a power of two: few distinct shapes for the
                # attention kernels, which MLX's CUDA back-end builds per shape (cuDNN:
                # 40-700 ms each, measured on an H200).
                cut = unit
                while cut * 2 <= n:
                    cut *= 2
                n = cut
            if self.hybrid:
                # End a chunk on the prompt's last full block, so that the recurrent state
                # there is snapshotted for the prefix cache (see _keep_state).
                boundary = (row.prompt_len - 1) // unit * unit
                if row.cache.length < boundary < row.cache.length + n:
                    n = boundary - row.cache.length
            if n == row.unfed and row.num_generated:
                # Generated tokens fed again (a hybrid row's draft was partly rejected, or a
                # preempted row's recompute): its next token may come with a draft too.
                n += self._draft(row)
            plan.append((row, n))
            budget -= n
            chunks += 1
        if self._lazy_drafts:
            # A draft model's drafts: computed together, read back once.
            for row, draft in zip(self._lazy_drafts, resolve_drafts([row.draft for row in self._lazy_drafts])):
                row.draft = draft
        plan = self._reserve(plan)
        feeds, rows, reading = [], [], []
        for row, n in plan:
            start = row.cache.length
            if row.pending:
                # Its token is still on the device: read it from the last step's samples.
                feed = Feed(row.id, [0], start, row.cache, "last", from_previous=row.pending_index)
            elif row.draft:
                # Its unfed tokens, then the draft; logits at the last len(draft) + 1
                # positions, each sampled (see _launch).
                feed = Feed(row.id, row.tokens[start:] + row.draft, start, row.cache, len(row.draft) + 1)
            else:
                reaches_end = start + n == len(row.tokens)
                scoring = row.prompt_scores is not None and start < row.prompt_len
                if start < row.prompt_len:
                    reading.append((row, start))
                feed = Feed(row.id, row.tokens[start : start + n], start, row.cache,
                            "all" if scoring else "last" if reaches_end else "none")
            feeds.append(feed)
            rows.append(row)
        return feeds, rows, reading

    def _draft(self, row: Row) -> int:
        """Speculation: ask the row's drafter for tokens to verify after its next one (kept in
        row.draft); returns how many. None when the row does not speculate, backs off after
        failed drafts, its next token is not known yet (pending), or the draft could only run
        past max_tokens or the context."""
        row.draft = []
        if row.drafter is None:
            return 0
        if row.draft_backoff:
            row.draft_backoff -= 1
            return 0
        if row.pending:
            return 0
        room = min(self.draft_tokens,
                   row.params.max_tokens - row.num_generated - 1,  # the row's next token comes too
                   self.config.context_length - len(row.tokens) - 1)
        if room > 0:
            draft = row.drafter.propose(row.tokens, room)
            if not isinstance(draft, list):  # a draft model's, computed with the others (_plan)
                self._lazy_drafts.append(row)
            elif not draft:
                self._draft_missed(row)
            row.draft = draft
        return len(row.draft)

    @staticmethod
    def _draft_missed(row: Row) -> None:
        """No draft, or none of it accepted: the row decodes without drafting for the next
        1, 3, 7, 15, then 16 steps. Drafting costs where it gains nothing: a step whose row
        may draft is read back at once (it drafts from its tokens), not overlapped with the
        next one, and verifying costs more than decoding where the device is busy."""
        row.draft_misses += 1
        row.draft_backoff = min(2 ** row.draft_misses - 1, MAX_DRAFT_BACKOFF)

    def _prefill_budget(self, decoding_rows: int) -> int:
        """Prefill tokens for a step with this many decoding rows: `max_batch_tokens` with
        none, `mixed_batch_tokens` (at most `max_batch_tokens`) with up to `budget_rows`, and
        beyond in proportion to them (whole blocks). The decode part of a step costs more the
        more rows it carries (attention over every row's keys, bigger batched products), what
        a chunk adds does not; so a bigger chunk beside many rows stalls them relatively no
        more than `mixed_batch_tokens` beside `budget_rows`, and admits waiting prompts in
        fewer of those expensive steps. H200, Qwen3-0.6B, 64
        streams (docs/performance-history.md, the third session): a step with a 1,024-token
        chunk took 17.6 ms against 10.1 ms decoding alone, and 128 requests ran at 5,620
        generated tok/s with chunks of 1,024 tokens against 4,864 with 512."""
        base, rows = self.config.decoding_batch_tokens, self.config.budget_rows
        if decoding_rows == 0:
            return self.config.max_batch_tokens
        if decoding_rows <= rows:
            return base
        unit = self.config.block_size
        return max(base, base * decoding_rows // rows // unit * unit)

    def _reserve(self, plan: list[tuple[Row, int]]) -> list[tuple[Row, int]]:
        """Make room for the plan, preempting the youngest rows when memory runs out.

        `reserve` only acts when a row's slot is too small, so retrying the whole plan after
        a preemption does not allocate twice.
        """
        while True:
            try:
                for row, n in plan:
                    row.cache.reserve(n)
                return plan
            except OutOfKVMemory:
                if any(row.draft for row, _ in plan):
                    # Drafts are optional: memory goes to the rows' own tokens first, and no
                    # one is preempted to make room for a draft.
                    plan = [(row, n - len(row.draft)) for row, n in plan]
                    for row, _ in plan:
                        row.draft = []
                    continue
                victim = self.running[-1]
                if len(self.running) > 1:
                    self._preempt(victim)
                elif self.kv.fits_alone(victim.total + 1):
                    # Alone, it cannot hold its slot and the bigger one it moves to at once,
                    # but the bigger one alone fits: it gives its slot up and recomputes.
                    victim.fresh_slot = True
                    self._preempt(victim)
                elif victim.pending:
                    # Alone, it has grown as far as the budget allows: it ends there, as a
                    # row that reaches the model's context does, with the token it has in
                    # flight (sampled where its slot ends; read back step by step, it would
                    # have been committed already).
                    victim.out_of_room = True
                else:
                    self._events.append(self._finish_flushed(victim, "length"))
                plan = [(r, m) for r, m in plan if r is not victim]

    def _preempt(self, row: Row) -> None:
        """Free a row's memory and send it back to the front of the queue; its tokens are
        kept, and recomputed when it is admitted again unless its slot is still cached."""
        row.draft, row.before_draft = [], None
        if hasattr(row.drafter, "forget"):
            row.drafter.forget()  # a draft context is memory too; the recompute rebuilds it
        self._remember(row)
        self._release(row)
        self.running.remove(row)
        self.waiting.appendleft(row)
        self.stats.preemptions += 1

    # ---- tokens out ----------------------------------------------------------------------
    def _commit(self, row: Row, token: int, logprob: TokenLogprob | None, now: float) -> TokenEvent:
        if row.first_token_time is None:
            row.first_token_time = now
        constraint = row.sampling.constraint
        if constraint is not None and constraint.error:  # its grammar refused the token (see consume)
            return self._finish(row, "error", error=constraint.error, now=now)
        row.tokens.append(token)
        lps = [logprob] if logprob is not None else None
        # (A final event has the step's time too: a step's events share one, by which /metrics
        # tells the tokens an accepted draft delivered at once.)
        if token in row.stop_ids:
            # The stop token itself has no text; release whatever text was held back.
            return self._finish_flushed(row, "stop", token_ids=[token], logprobs=lps, now=now)
        text, stopped = row.stops.feed(row.detokenizer.add(token))
        if stopped:
            return self._finish(row, "stop", token_ids=[token], text=text, logprobs=lps, now=now)
        if constraint is not None and constraint.finished:
            # The grammar is complete (a JSON value closed): nothing may follow it.
            return self._finish_flushed(row, "stop", text, token_ids=[token], logprobs=lps, now=now)
        if row.num_generated >= row.params.max_tokens or len(row.tokens) >= self.config.context_length:
            return self._finish_flushed(row, "length", text, token_ids=[token], logprobs=lps, now=now)
        return TokenEvent(row.id, [token], text, lps, time=now)

    def _finish_flushed(self, row: Row, reason: str, text: str = "", **fields) -> TokenEvent:
        """_finish at the end of the answer's text: `text`, then what was held back for UTF-8
        completion or a possible stop string. The last token's incomplete character becomes
        U+FFFD only now: where that completes a stop string, the text is cut there and the
        answer ends "stop", as wherever else a stop string cuts it."""
        flushed, stopped = row.stops.feed(row.detokenizer.flush())
        if not stopped:
            flushed += row.stops.flush()
        return self._finish(row, "stop" if stopped else reason, text=text + flushed, **fields)

    def _finish(self, row: Row, reason: str, error: str | None = None, *, token_ids=(), text: str = "", logprobs=None,
                embedding: list[float] | None = None, now: float | None = None) -> TokenEvent:
        """The row's final event; `now`: the time of the step that made its last token, if one did."""
        row.finished = True
        row.draft, row.before_draft = [], None
        if reason != "error":
            self._remember(row)
            self._release(row)
            if self.draft_contexts is not None and hasattr(row.drafter, "settle"):
                room = self.draft_contexts.max_positions - self._draft_buffers(leaving=row)
                self.draft_contexts.keep(row.tokens, row.drafter, room)
        else:
            row.cache.release()
        if row in self.running:
            self.running.remove(row)
        elif row in self.waiting:
            if row is self.waiting[0]:
                self.kv.drop_growths()  # any shelf growing in steps was growing for it
            self.waiting.remove(row)
        now = time.perf_counter() if now is None else now
        ttft = row.first_token_time - row.arrival if row.first_token_time else None
        decode_rate = None
        if row.first_token_time and row.num_generated > 1 and now > row.first_token_time:
            decode_rate = (row.num_generated - 1) / (now - row.first_token_time)
        return TokenEvent(
            request_id=row.id,
            token_ids=list(token_ids),
            text=text,
            logprobs=logprobs,
            finish_reason=reason,
            error=error,
            prompt_tokens=row.prompt_len,
            completion_tokens=row.num_generated,
            cached_tokens=row.cached_tokens,
            ttft_s=ttft,
            decode_tok_s=decode_rate,
            time=now,
            prompt_logprobs=row.prompt_scores,
            embedding=embedding,
        )

    def snapshot_stats(self) -> dict:
        return {
            "running": len(self.running),
            "waiting": len(self.waiting),
            "kv_bytes_in_use": self.kv.bytes_in_use,
            "kv_bytes_allocated": self.kv.bytes_allocated,
            "kv_bytes_budget": self.kv.max_bytes,
            "prefix_cached_bytes": self.prefix.cached_bytes if self.prefix else 0,
            **(self.prefix.stats.as_dict() if self.prefix else {}),
            **self.stats.as_dict(),
        }


@dataclass
class SchedulerStats:
    steps: int = 0
    prefill_tokens: int = 0
    decode_tokens: int = 0
    busy_seconds: float = 0.0
    preemptions: int = 0
    drafted_tokens: int = 0  # speculation: draft tokens verified...
    accepted_tokens: int = 0  # ...and accepted
    # (end time, prefill tokens, decode tokens) of recent steps, for the tokens/s rates
    recent: deque = field(default_factory=deque)

    RATE_WINDOW_S = 2.0

    def record_step(self, prefill: int, decode: int, seconds: float) -> None:
        self.steps += 1
        self.prefill_tokens += prefill
        self.decode_tokens += decode
        self.busy_seconds += seconds
        self.recent.append((time.perf_counter(), prefill, decode))

    def record_draft(self, drafted: int, accepted: int, decoded: int) -> None:
        """A verified draft: `accepted` of its tokens in the answer, and `decoded` tokens the
        answer got beyond the one the step counted."""
        self.drafted_tokens += drafted
        self.accepted_tokens += accepted
        self.decode_tokens += decoded
        if decoded:
            self.recent.append((time.perf_counter(), 0, decoded))

    def take_back_decoded(self) -> None:
        """A token a step counted as decoded reached no answer (see Scheduler._read_back)."""
        self.decode_tokens -= 1
        self.recent.append((time.perf_counter(), 0, -1))

    def rates(self, now: float) -> tuple[float, float]:
        """Prefill and decode tokens per second over the last RATE_WINDOW_S seconds."""
        while self.recent and self.recent[0][0] < now - self.RATE_WINDOW_S:
            self.recent.popleft()
        prefill = sum(p for _, p, _ in self.recent)
        # (at least 0: a taken-back token, see take_back_decoded, may outlive its count's entry)
        decode = max(0, sum(d for _, _, d in self.recent))
        return prefill / self.RATE_WINDOW_S, decode / self.RATE_WINDOW_S

    def as_dict(self) -> dict:
        prefill_rate, decode_rate = self.rates(time.perf_counter())
        return {
            "steps": self.steps,
            "prefill_tokens": self.prefill_tokens,
            "decode_tokens": self.decode_tokens,
            "prefill_tok_s": round(prefill_rate, 1),
            "decode_tok_s": round(decode_rate, 1),
            "busy_seconds": round(self.busy_seconds, 4),
            "preemptions": self.preemptions,
            "drafted_tokens": self.drafted_tokens,
            "accepted_tokens": self.accepted_tokens,
        }
