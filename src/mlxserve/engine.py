"""The engine: one thread that owns every MLX call, fed through a command queue.

MLX is not thread-safe, so the model, the caches and the scheduler live on the engine
thread alone. Front ends call `submit()` (any thread, or asyncio) and read a RequestStream
of TokenEvents; `cancel()` frees a request's memory within one step.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import queue
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, replace

import mlx.core as mx
from rich.filesize import decimal as human_size

from .batch import on_cuda
from .cache import KVStore
from .grammar import Grammars
from .interrupts import SIGNAL_CHECK_S, wait_for
from .loader import LoadedModel
from .memory import default_kv_budget, weight_bytes
from .models import products
from .runner import Runner
from .scheduler import Request, Scheduler, SchedulerConfig, ServerBusy, TokenEvent, check_fits, check_memory

log = logging.getLogger("mlxserve.engine")

STATS_REFRESH_S = 0.5  # how stale the published stats may get while the engine is idle
SHUTTING_DOWN = "server is shutting down"  # the error of requests that abort_all ends
ENGINE_STOPPED = "engine stopped"  # the error of requests in flight when the engine loop died
# What a Ctrl-C does while Engine.stop waits for the step in flight (tens of seconds for a long
# prompt's chunk on a CPU): None, nothing (the wait goes on: a process that exits normally
# while the engine thread is inside MLX aborts); the command line sets a function that ends
# the process at once (os._exit, which skips that teardown: cli._exit_at_once).
on_ctrl_c_while_stopping: Callable[[], None] | None = None


class EngineStopped(RuntimeError):
    """submit() after the engine loop has ended, or while it ends."""


@dataclass
class EngineConfig(SchedulerConfig):
    """The scheduler's settings plus the KV memory budget."""

    memory_budget_bytes: int | None = None  # KV budget; None: a share of device memory


class RequestStream:
    """Events of one request, readable from a thread (iterate) or from asyncio (async for)."""

    def __init__(self, request: Request, engine: "Engine", loop: asyncio.AbstractEventLoop | None,
                 on_finish: Callable[[TokenEvent, list[float]], None] | None = None):
        self.request = request
        self._engine = engine
        self._loop = loop
        self._queue: queue.Queue | asyncio.Queue = asyncio.Queue() if loop else queue.Queue()
        self.finished = False
        # Called with the final event and every token's time, whether or not anyone reads
        # the stream to its end (a client that went away).
        self._on_finish = on_finish
        self._token_times: list[float] = []
        # Set by the first final event: the engine's, or Engine.abort_all's from another
        # thread while the engine is inside a step. Nothing is delivered after it.
        self._ended = False
        self._end_lock = threading.Lock()
        self._counted = True  # in the engine's requests_in_progress (see Engine._count_out)

    def _accept(self, event: TokenEvent) -> bool:
        """Whether to deliver the event (not after a final one); observes it if so."""
        with self._end_lock:
            if self._ended:
                return False
            self._ended = event.finish_reason is not None
        self._observe(event)
        return True

    def _observe(self, event: TokenEvent) -> None:
        if self._on_finish is None:
            return
        if event.token_ids:
            self._token_times.append(event.time)
        if event.finish_reason is not None:
            try:
                self._on_finish(event, self._token_times)
            except Exception:  # an observer's bug must not stop the engine
                log.exception("on_finish failed")

    @property
    def id(self) -> str:
        return self.request.id

    def _push(self, event: TokenEvent) -> None:  # engine thread, or abort_all
        if not self._accept(event):
            return
        if self._loop is not None:
            try:
                self._loop.call_soon_threadsafe(self._queue.put_nowait, event)
            except RuntimeError:  # the loop closed: nobody is listening any more
                pass
        else:
            self._queue.put(event)

    def _push_later(self, event: TokenEvent, batches: dict) -> None:  # engine thread
        """Like _push, but an asyncio stream's event joins its loop's batch (see
        Engine._deliver): one wake-up of the loop per step, not one per event."""
        if not self._accept(event):
            return
        if self._loop is not None:
            batches.setdefault(self._loop, []).append((self._queue, event))
        else:
            self._queue.put(event)

    def __iter__(self):
        while True:
            try:
                event = self._queue.get(timeout=SIGNAL_CHECK_S)
            except queue.Empty:
                continue  # (back in Python for a moment: a Ctrl-C's handler runs here, see interrupts.py)
            yield event
            if event.finish_reason is not None:
                self.finished = True
                return

    async def __aiter__(self):
        while True:
            event = await self._queue.get()
            yield event
            if event.finish_reason is not None:
                self.finished = True
                return

    def cancel(self) -> None:
        if not self.finished:
            # Queued first: a request submitted into the room this makes is queued after the
            # cancellation, so the engine frees this one's row before it adds that one.
            self._engine.cancel(self.id)
            self._engine._count_out(self)


class Engine:
    def __init__(self, loaded: LoadedModel, config: EngineConfig | None = None):
        self.loaded = loaded
        self.tokenizer = loaded.tokenizer
        self.config = config or EngineConfig()
        self._commands: queue.Queue = queue.Queue()
        self._streams: dict[str, RequestStream] = {}
        self._worker: _MLXWorker | None = None
        self._done = threading.Event()  # set when the engine loop has returned
        self._stopping = False
        self._outstanding = 0  # submitted and not finished
        self._closed = False  # the engine loop has ended: submit refuses
        self._refusal: str | None = None  # set by abort_all(refuse_later=True): why submit refuses
        self._outstanding_lock = threading.Lock()
        self._stats: dict = {}
        self.error: str | None = None
        self._ready = threading.Event()
        self._kv = None  # the scheduler's KV store, once built: its budget checks prompts at submit
        self._scheduler: Scheduler | None = None  # once built: prompt_progress reads it
        # Constrained decoding over this model's vocabulary: front ends check a request's
        # grammar here before submitting it (Grammars.check, off their event loop: its first
        # call indexes the vocabulary, 0.4 s for 49k tokens on a 2-core x86 CPU); the
        # scheduler compiles it for the row.
        self.grammars = Grammars(loaded.tokenizer)

    # ---- lifecycle ---------------------------------------------------------------------
    def start(self) -> "Engine":
        self._worker = _acquire_worker()
        self._worker.run(self._run_guarded)
        try:
            wait_for(self._ready)
        except BaseException:  # Ctrl-C during the warm-up: stop the thread before raising
            self.stop()
            raise
        if self.error:
            raise RuntimeError(self.error)
        return self

    def stop(self, first_ctrl_c_after: bool = False) -> None:
        """Stop the engine loop and wait for it. `first_ctrl_c_after`: this stop is no answer
        to a Ctrl-C (the work was done), so a first Ctrl-C while it waits is the user's first:
        raised once the engine has stopped, not taken for a second one that quits at once."""
        self._stopping = True
        self._commands.put(("wake", None))
        interrupted = False
        if self._worker is not None:
            # Wait for the engine thread to leave MLX, through any further Ctrl-C: a process
            # that exits while a thread is inside MLX aborts (SIGABRT) instead of exiting
            # (unless on_ctrl_c_while_stopping ends it at once).
            while True:
                try:
                    wait_for(self._done)
                    break
                except KeyboardInterrupt:
                    if first_ctrl_c_after and not interrupted:
                        interrupted = True
                        continue
                    if on_ctrl_c_while_stopping is not None:
                        on_ctrl_c_while_stopping()
                    continue
            _release_worker(self._worker)
            self._worker = None
        if interrupted:
            raise KeyboardInterrupt

    @property
    def alive(self) -> bool:
        """True while the engine loop runs (false before start, after stop or a crash, and
        already while it ends its streams: a client told its request ended because the
        engine stopped finds /health saying so)."""
        return self._worker is not None and not self._done.is_set() and not self._closed

    def __enter__(self) -> "Engine":
        return self.start()

    def __exit__(self, exc_type, *exc) -> None:
        # Leaving the block normally (between a bench's runs), a Ctrl-C is the first one.
        self.stop(first_ctrl_c_after=exc_type is None)

    # ---- front-end API (any thread) ------------------------------------------------------
    def submit(self, request: Request, loop: asyncio.AbstractEventLoop | None = None,
               on_finish: Callable[[TokenEvent, list[float]], None] | None = None) -> RequestStream:
        request.params.validate()
        if not request.prompt_ids:
            raise ValueError("prompt: must contain at least one token")
        check_fits(len(request.prompt_ids), self.loaded.context_length)
        if self._kv is not None:
            check_memory(len(request.prompt_ids), self._kv)  # its sizes never change: safe here
        if not self.alive:
            raise EngineStopped("engine is not running")
        with self._outstanding_lock:
            if self._closed:  # the loop has ended, or is ending (stop() while a step ran)
                raise EngineStopped("engine is not running")
            if self._refusal is not None:  # (a server shutting down: see abort_all)
                raise EngineStopped(self._refusal)
            # Refuse here, in the caller's thread, so that a server can answer 429 at once.
            limit = self.config.request_limit
            if self._outstanding >= limit:
                raise ServerBusy(f"server busy: {self._outstanding} requests in progress (limit {limit})")
            self._outstanding += 1
            stream = RequestStream(request, self, loop, on_finish)
            self._commands.put(("submit", stream))  # under the lock: see _run_guarded
        return stream

    def cancel(self, request_id: str) -> None:
        self._commands.put(("cancel", request_id))

    def _count_out(self, stream: RequestStream) -> None:
        """Take a request out of requests_in_progress, once: when it is cancelled or when its
        final event is delivered, whichever comes first."""
        with self._outstanding_lock:
            if stream._counted:
                stream._counted = False
                self._outstanding -= 1

    def abort_all(self, message: str, refuse_later: bool = False) -> None:
        """End every submitted request (running or waiting) with an error event carrying
        `message`: its stream ends now, and the engine frees its row after the step in
        progress (which on a slow machine can take many seconds); the engine goes on running.
        `refuse_later`: every later submit raises EngineStopped(message) too. A server that
        shuts down still reads the requests whose bodies were arriving (or being parsed) when
        it began: without this they were accepted after the abort and ran their whole answers,
        holding up the exit until uvicorn's grace period cut them off."""
        if refuse_later:
            # Set before the abort is queued: a submit that got in first queued its request
            # ahead of the abort (under this lock), which then ends it too.
            with self._outstanding_lock:
                self._refusal = message
        self._commands.put(("abort", message))
        now = time.perf_counter()
        for stream in list(self._streams.values()):
            stream._push(TokenEvent(stream.id, [], "", finish_reason="error", error=message, time=now))

    def stats(self) -> dict:
        """The scheduler's statistics as of its last step (the engine thread updates them after
        every step), and `requests_in_progress`, counted now: requests accepted and not yet
        finished, those the scheduler has not taken in yet included (a step can take many
        seconds on a CPU); a cancelled one is counted out at once, not when the engine frees
        its row after the step in flight. It is what the busy limit (max_running +
        max_waiting) is checked against."""
        return {**self._stats, "requests_in_progress": self._outstanding}

    def prompt_progress(self, request_id: str) -> tuple[int, int] | None:
        """(prompt tokens read, prompt tokens) until the request's first token comes, else None
        (also before the engine thread has taken it in; see Scheduler.prompt_progress): for a
        front end's progress display, from any thread."""
        scheduler = self._scheduler
        return scheduler.prompt_progress(request_id) if scheduler is not None else None

    def generate(self, prompt_ids: list[int], params) -> list[TokenEvent]:
        """Blocking convenience: submit and collect every event."""
        return list(self.submit(Request(list(prompt_ids), params)))

    # ---- engine thread --------------------------------------------------------------------
    def _run_guarded(self) -> None:
        try:
            self._run()
        except BaseException:
            log.error("engine loop died: %s", traceback.format_exc())
        finally:
            # Nobody waits forever: streams still open end with an error, those the loop
            # never took from its queue too (submitted while it was ending), and no submit
            # gets through after this.
            with self._outstanding_lock:
                self._closed = True
            while True:
                try:
                    kind, payload = self._commands.get_nowait()
                except queue.Empty:
                    break
                if kind == "submit":
                    self._streams[payload.id] = payload
            for stream in list(self._streams.values()):
                stream._push(TokenEvent(stream.id, [], "", finish_reason="error", error=ENGINE_STOPPED,
                                        time=time.perf_counter()))
            self._streams.clear()
            release_garbage_collector()
            self._done.set()
            self._ready.set()

    def _run(self) -> None:
        try:
            scheduler = make_scheduler(self.loaded, self.config, self.grammars)
            self._kv = scheduler.kv
            self._scheduler = scheduler
            scheduler.warm_up()
        except Exception as exc:  # surfaced by start()
            self.error = f"engine failed to start: {exc}"
            self._ready.set()
            return
        settle_garbage_collector()
        self._stats = scheduler.snapshot_stats()  # /v1/stats has figures before the first request
        self._ready.set()
        while not self._stopping:
            self._drain(scheduler, block=not scheduler.has_work())
            if self._stopping or not scheduler.has_work():
                continue
            try:
                events = scheduler.step()
            except Exception as exc:
                log.error("step failed: %s", traceback.format_exc())
                events = self._fail_rows(scheduler, f"internal error: {exc}")
            self._deliver(scheduler, events)
        for row in list(scheduler.running) + list(scheduler.waiting):
            self._deliver(scheduler, [scheduler.cancel(row.id)])

    def _drain(self, scheduler: Scheduler, block: bool) -> None:
        while True:
            try:
                # While idle, wake now and then so that the published rates decay to zero.
                kind, payload = self._commands.get(block=block, timeout=STATS_REFRESH_S if block else None)
            except queue.Empty:
                if block:
                    self._stats = scheduler.snapshot_stats()
                return
            block = False
            if kind == "submit":
                self._streams[payload.id] = payload
                try:
                    scheduler.add(payload.request)
                except (ServerBusy, ValueError) as exc:  # refused: the stream ends with why
                    busy = TokenEvent(payload.id, [], "", finish_reason="error", error=str(exc), time=time.perf_counter())
                    self._deliver(scheduler, [busy])
            elif kind == "cancel":
                self._deliver(scheduler, [scheduler.cancel(payload)])
            elif kind == "abort":
                self._deliver(scheduler, self._fail_rows(scheduler, payload, waiting=True))

    def _deliver(self, scheduler: Scheduler, events: list) -> None:
        # Publish stats first: a client that sees its final event also sees its memory freed.
        self._stats = scheduler.snapshot_stats()
        # A step's events for asyncio streams go to their loop as one callback: each
        # call_soon_threadsafe wakes the loop's thread, and at 64 streams per-event wake-ups
        # kept that thread busy for a good part of every step, holding the GIL that this
        # thread needs to build the next step.
        batches: dict = {}
        for event in events:
            if event is None:
                continue
            stream = self._streams.get(event.request_id)
            if stream is None:
                continue
            if event.finish_reason is not None:  # (first: a reader of its end sees it counted out)
                del self._streams[event.request_id]
                self._count_out(stream)
            stream._push_later(event, batches)
        for loop, items in batches.items():
            try:
                loop.call_soon_threadsafe(_put_all, items)
            except RuntimeError:  # the loop closed: nobody is listening any more
                pass

    @staticmethod
    def _fail_rows(scheduler: Scheduler, message: str, waiting: bool = False) -> list[TokenEvent]:
        """End the running rows (and the waiting ones too, if `waiting`) with an error; the
        engine stays alive. For a step that raised, the rows that were in it."""
        events = []
        for row in list(scheduler.running) + (list(scheduler.waiting) if waiting else []):
            event = scheduler.cancel(row.id)
            event.finish_reason, event.error = "error", message
            events.append(event)
        return events


def settle_garbage_collector() -> None:
    """Collect once, then keep every object that exists now (modules, the model, compiled
    traces) out of later collections (gc.freeze). Python's full collection visits every
    tracked object, and a front end's imports make a few hundred thousand: one took 80-100 ms
    on the 2-core CPU machine; a bench process on the H200's host ran seven, the longest 181
    and 238 ms in two runs (scripts/gc_pauses.py). Every stream stops for such a pause.
    Later collections see only objects made after start-up; objects whose last reference
    goes are freed as before. Undone when the engine stops (release_garbage_collector)."""
    gc.collect()
    gc.freeze()


def release_garbage_collector() -> None:
    """Hand the frozen objects back to the collector when an engine stops. A model is freed
    only by a collection (its layers and their compiled functions refer to each other), so
    a model dropped after its engine (a chat switching models) would otherwise stay in memory
    for good. Engines still running are frozen again by the next one that starts."""
    gc.unfreeze()


def _put_all(items: list) -> None:  # in the streams' event loop
    for q, event in items:
        q.put_nowait(event)


class _MLXWorker:
    """A long-lived thread that runs one engine loop at a time.

    MLX keeps per-thread state (e.g. the compile cache) whose destructor needs the GIL. If
    a thread that used MLX exits while Python is shutting down, that destructor aborts the
    process ("terminate called without an active exception", ml-explore/mlx#3126). So MLX
    threads never exit: a stopped engine hands its thread back for the next engine, and
    idle workers simply wait until the process ends.
    """

    def __init__(self):
        self._jobs: queue.Queue = queue.Queue()
        self._thread = threading.Thread(target=self._loop, name="mlxserve-engine", daemon=True)
        self._thread.start()

    def run(self, job) -> None:
        self._jobs.put(job)

    def _loop(self) -> None:
        while True:
            self._jobs.get()()


_idle_workers: list[_MLXWorker] = []
_workers_lock = threading.Lock()


def _acquire_worker() -> _MLXWorker:
    with _workers_lock:
        return _idle_workers.pop() if _idle_workers else _MLXWorker()


def _release_worker(worker: _MLXWorker) -> None:
    with _workers_lock:
        _idle_workers.append(worker)


def make_scheduler(loaded: LoadedModel, config: EngineConfig, grammars: Grammars | None = None) -> Scheduler:
    """Build the KV pools, runner and scheduler for a loaded model (on the engine thread),
    and the DFlash draft if speculation asks for one. `grammars`: see Scheduler."""
    model = loaded.model
    layers, kv_heads, head_dim = model.kv_shape()
    draft = load_draft(loaded, config.draft_model) if config.speculative == "dflash" else None
    budget = config.memory_budget_bytes if config.memory_budget_bytes is not None else default_kv_budget(model)
    shared = None
    if draft is not None:
        if config.memory_budget_bytes is None:
            budget -= weight_bytes(draft)
        # The budget holds the draft's context too (spec/dflash.py: K/V of every position,
        # per row): the KV gets its share of each position's bytes.
        kv_bytes = layers * 2 * kv_heads * head_dim * _compute_dtype(model).size
        shared = budget
        budget = budget * kv_bytes // (kv_bytes + draft.context_bytes_per_token())
    kv = KVStore(layers, kv_heads, head_dim, _compute_dtype(model), block_size=config.block_size,
                 max_bytes=budget, max_row_tokens=loaded.context_length,
                 state_bytes_per_row=model.state_bytes_per_row() if hasattr(model, "state_bytes_per_row") else 0)
    if shared is not None:
        kv.budget_note = (f"the KV cache's share of the {human_size(shared)} memory budget is {human_size(budget)} "
                          f"(the DFlash draft's context takes the rest)")
    if not kv.fits_alone(1):
        smallest = kv.capacity_for(1)
        raise ValueError(f"{kv.budget_text}, smaller than one {smallest}-token slot of this model "
                         f"({human_size(kv.slot_bytes_for(1))}): raise --memory-budget")
    capture = draft.target_layer_ids if draft is not None else ()
    if on_cuda():
        products.use_dequantizing_products(model)  # see products.DEQUANTIZE_FROM_ROWS
    return Scheduler(Runner(model, kv, capture), loaded.tokenizer, replace(config, context_length=loaded.context_length),
                     draft=draft, grammars=grammars)


def load_draft(loaded: LoadedModel, spec: str | None):
    """The DFlash draft for `loaded`'s model: a checkpoint (folder, alias or Hugging Face repo
    id), or "random" (random weights at the target's shape, for benchmarks)."""
    from .spec.dflash import load_dflash_draft, random_dflash_draft

    if not spec:
        raise ValueError("--speculative dflash needs --draft-model (a DFlash draft trained for this model)")
    dtype = _compute_dtype(loaded.model)
    if spec == "random":
        return random_dflash_draft(loaded.model, dtype)
    from .registry import resolve

    return load_dflash_draft(resolve(spec, progress=True), loaded.model, dtype)


def _compute_dtype(model) -> mx.Dtype:
    """The dtype activations run in: that of the norms (quantized layers follow their scales)."""
    return model.model.norm.weight.dtype
