"""The engine and its step-driven scheduler on a tiny model: batching, chunking, memory,
cancellation, stop rules and seeds."""

from dataclasses import replace

import mlx.core as mx
import numpy as np
import pytest

from mlxserve import scheduler as scheduler_module
from mlxserve.engine import Engine, EngineConfig, make_scheduler
from mlxserve.loader import load_model
from mlxserve.sampling import SamplingParams
from mlxserve.scheduler import Request
from tiny_models import reference_prompt_logprobs

GREEDY = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def loaded(tiny_model_dir):
    return load_model(str(tiny_model_dir("qwen3", "float32")), progress=False)


def prompts(tokenizer):
    texts = [
        "Hello",
        "The capital of France is",
        "def add(a, b):\n    return a + b",
        "Once upon a time there was a tiny model that generated text one token at a time.",
        "Numbers: 0 1 2 3 4 5 6 7 8 9 10 100 1000.",
    ]
    return [tokenizer.encode(t) for t in texts]


def run_alone(loaded, prompt_ids, params=GREEDY, **cfg):
    with Engine(loaded, EngineConfig(**cfg)) as engine:
        events = engine.generate(prompt_ids, params)
    return [t for e in events for t in e.token_ids]


def run_together(engine, prompt_list, params=GREEDY):
    streams = [engine.submit(Request(p, params)) for p in prompt_list]
    return [[t for e in s for t in e.token_ids] for s in streams]


def test_concurrent_requests_match_each_alone(loaded):
    plist = prompts(loaded.tokenizer)
    alone = [run_alone(loaded, p) for p in plist]
    for chunk in (1, 7, 64):
        with Engine(loaded, EngineConfig(max_batch_tokens=chunk, block_size=8)) as engine:
            assert run_together(engine, plist) == alone, chunk


@pytest.mark.parametrize("fused", [False, True])
def test_requests_joining_at_different_steps(loaded, monkeypatch, fused):
    """Requests submitted while others decode join between steps and still match; also with
    the decoding rows attending through MLX's fused attention, padded (batch.FUSED_DECODE)."""
    from mlxserve import batch as batch_module

    monkeypatch.setattr(batch_module, "FUSED_DECODE", fused)
    monkeypatch.setattr(batch_module, "FUSED_DECODE_MIN_ROWS", 2)
    monkeypatch.setattr(batch_module, "FUSED_DECODE_ROW_UNIT", 4)
    plist = prompts(loaded.tokenizer)
    alone = [run_alone(loaded, p, SamplingParams(max_tokens=10 + i, temperature=0.0, ignore_eos=True))
             for i, p in enumerate(plist)]
    with Engine(loaded, EngineConfig(max_batch_tokens=16, block_size=8)) as engine:
        streams, outputs = [], [None] * len(plist)
        first = engine.submit(Request(plist[0], SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)))
        collected = []
        for i, event in enumerate(first):
            collected.extend(event.token_ids)
            if i + 1 < len(plist):  # submit the next request after each token of the first
                params = SamplingParams(max_tokens=10 + i + 1, temperature=0.0, ignore_eos=True)
                streams.append(engine.submit(Request(plist[i + 1], params)))
        outputs[0] = collected
        for i, s in enumerate(streams, start=1):
            outputs[i] = [t for e in s for t in e.token_ids]
    assert outputs == alone


def test_long_prompt_is_chunked_while_others_decode(loaded):
    """Driven step by step: a long prompt takes ceil(P / chunk) steps, and the row that was
    already decoding emits a token in every one of them. (Steps are pipelined: a step's
    tokens are read back, and become events, during the next step.)"""
    tok = loaded.tokenizer
    chunk = 8  # decode tokens ride on top of the budget: the chunk is the whole budget
    sched = make_scheduler(loaded, EngineConfig(max_batch_tokens=chunk, block_size=8))
    short = Request(tok.encode("Hello"), SamplingParams(max_tokens=500, temperature=0.0, ignore_eos=True))
    sched.add(short)
    while not any(e.request_id == short.id for e in sched.step()):
        pass
    # Its first token came back at once (no row was decoding); from now on each step reads
    # back the one before: this step puts a decode in flight.
    assert not sched.step()
    long_prompt = tok.encode(" ".join(["The sky is blue because of Rayleigh scattering."] * 6))
    long = Request(long_prompt, SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True))
    sched.add(long)
    steps = 0
    while True:
        events = sched.step()
        steps += 1
        assert any(e.request_id == short.id for e in events), f"short row stalled at step {steps}"
        if any(e.request_id == long.id and e.finish_reason for e in events):
            break
    assert steps == -(-len(long_prompt) // chunk) + 1
    assert sched.cancel(short.id).finish_reason == "cancelled"
    assert sched.kv.bytes_in_use == 0


@pytest.mark.parametrize("waiter", ["stream", "event", "thread"])
def test_a_ctrl_c_that_another_thread_received_still_stops_a_waiting_main_thread(waiter):
    """The kernel may hand a Ctrl-C to any thread that does not block it; Python raises
    KeyboardInterrupt only in the main thread, and only once it runs. A main thread waiting
    for an event (reading a stream; interrupts.wait_for, as Engine.start waits for the
    warm-up; interrupts.join) must wake for it: `run` and piped `chat` hung so on a busy
    machine."""
    import signal
    import sys
    import threading

    from mlxserve.engine import RequestStream
    from mlxserve.interrupts import join, wait_for
    from mlxserve.scheduler import TokenEvent

    if waiter == "stream":
        stream = RequestStream(Request([1], GREEDY), None, None)
        wait = lambda: next(iter(stream))  # noqa: E731
        release = lambda: stream._queue.put(TokenEvent(stream.id, [], "", finish_reason="stop"))  # noqa: E731
        waiting_in = RequestStream.__iter__.__code__
    elif waiter == "event":
        done = threading.Event()
        wait, release = (lambda: wait_for(done)), done.set
        waiting_in = wait_for.__code__
    else:  # a thread to end, as the chat's next question waits for a cut answer's cancellation
        done = threading.Event()
        worker = threading.Thread(target=done.wait)
        worker.start()
        wait, release = (lambda: join(worker)), done.set
        waiting_in = join.__code__
    main = threading.main_thread().ident
    receiver_parked, interrupted, released = threading.Event(), threading.Event(), threading.Event()
    receiver = threading.Thread(target=receiver_parked.wait)  # a thread the signal goes to
    receiver.start()

    def interrupt_once_main_waits():
        while not _inside(waiting_in, sys._current_frames().get(main)):
            pass  # (until the main thread waits there)
        signal.pthread_kill(receiver.ident, signal.SIGINT)
        if not interrupted.wait(30):  # a bound for a failing test: release the main thread
            released.set()
            release()
        receiver_parked.set()

    killer = threading.Thread(target=interrupt_once_main_waits)
    killer.start()
    try:
        with pytest.raises(KeyboardInterrupt):
            wait()
        # (Released, the main thread would raise it too, but only then.)
        assert not released.is_set(), "the main thread slept through the Ctrl-C"
    finally:
        interrupted.set()
        killer.join()
        receiver.join()
        release()  # (the thread case's worker ends)


def _inside(code, frame) -> bool:
    """Whether a thread whose current frame is `frame` runs inside the function of `code`."""
    while frame is not None:
        if frame.f_code is code:
            return True
        frame = frame.f_back
    return False


@pytest.mark.parametrize("text", ["The sky is blue because of Rayleigh scattering. " * 3, "Hello"])
def test_prompt_progress_counts_the_chunks_read_until_the_first_token(loaded, monkeypatch, text):
    """What front ends show while a prompt is read: (tokens read, prompt tokens), a chunk
    counted once the step after it has waited for the device to compute it, and shown until
    the first token comes (while the last chunk is computed too; a prompt of one chunk: 0)."""
    sched = make_scheduler(loaded, EngineConfig(max_batch_tokens=8, block_size=8))
    prompt = loaded.tokenizer.encode(text)
    chunks = -(-len(prompt) // 8)
    request = Request(prompt, SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True))
    assert sched.prompt_progress(request.id) is None  # not submitted
    sched.add(request)
    assert sched.prompt_progress(request.id) == (0, len(prompt))  # waiting
    # The figure a front end's thread sees while the engine thread waits inside a step: for
    # the device (the chunk before, on the CPU the tail of it), or for the first token.
    in_wait, in_read_back = [], []
    wait, read_back = sched._wait_for_device, sched._read_back
    monkeypatch.setattr(sched, "_wait_for_device",
                        lambda skip=False: in_wait.append(sched.prompt_progress(request.id)) or wait(skip))
    monkeypatch.setattr(sched, "_read_back",
                        lambda step: in_read_back.append(sched.prompt_progress(request.id)) or read_back(step))
    after = []
    while not any(e.request_id == request.id for e in sched.step()):
        after.append(sched.prompt_progress(request.id))
    assert after == [(8 * k, len(prompt)) for k in range(chunks - 1)]
    # Step k waits for chunk k - 1, which counts only once it has waited.
    assert in_wait == [(8 * max(k - 1, 0), len(prompt)) for k in range(chunks)]
    assert in_read_back == [(8 * (chunks - 1), len(prompt))]  # all the chunks before the last
    assert sched.prompt_progress(request.id) is None  # its first token came
    assert sched.prompt_progress("no such request") is None


def test_prompt_progress_is_never_ahead_whenever_a_step_runs_while_it_reads(loaded):
    """A front end's thread may be preempted at any line of prompt_progress while the engine
    thread steps. Wherever a step runs in the middle of the read, the figure counts nothing
    that step fed (the device has not been waited for it)."""
    import sys

    prompt = loaded.tokenizer.encode("The sky is blue because of Rayleigh scattering. " * 3)
    code = scheduler_module.Scheduler.prompt_progress.__code__
    at = 0
    while True:
        sched = make_scheduler(loaded, EngineConfig(max_batch_tokens=8, block_size=8))
        request = Request(prompt, SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True))
        sched.add(request)
        lines = 0

        def trace(frame, event, arg):
            nonlocal lines
            if frame.f_code is not code:
                return None
            if event == "line":
                if lines == at:
                    sched.step()  # (the trace function is not traced itself)
                lines += 1
            return trace

        previous = sys.gettrace()
        sys.settrace(trace)
        try:
            figure = sched.prompt_progress(request.id)
        finally:
            sys.settrace(previous)
        assert figure == (0, len(prompt)), f"a step run before line {at} of the read"
        if at >= lines - 1:
            break
        at += 1
    assert at > 0


def test_a_long_prompt_waits_while_its_shelf_grows_in_steps_and_no_row_stalls(loaded, monkeypatch):
    """A new request whose shelf must grow by more than cache.GROWTH_BYTES_PER_STEP waits
    while the shelf's new arrays are allocated a share per step (here one layer per step);
    the row already decoding emits a token in every step, and both answers are those of
    each request alone."""
    from mlxserve import cache as cache_module

    monkeypatch.setattr(cache_module, "GROWTH_BYTES_PER_STEP", 1)  # one layer's array per step
    tok = loaded.tokenizer
    chunk = 8
    short_ids = tok.encode("Hello")
    long_prompt = tok.encode(" ".join(["The sky is blue because of Rayleigh scattering."] * 6))
    params = SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True)
    expected = [run_alone(loaded, ids, params) for ids in (short_ids, long_prompt)]
    sched = make_scheduler(loaded, EngineConfig(max_batch_tokens=chunk, block_size=8))
    short = Request(short_ids, params)
    sched.add(short)
    got = {short.id: [], None: []}
    while not got[short.id]:
        for e in sched.step():
            got[e.request_id].extend(e.token_ids)
    assert not sched.step()  # pipelined from here: each step reads back the one before
    long = Request(long_prompt, params)
    got[long.id] = []
    sched.add(long)
    steps = 0
    while not got[long.id]:
        events = sched.step()
        steps += 1
        assert any(e.request_id == short.id for e in events), f"short row stalled at step {steps}"
        for e in events:
            got[e.request_id].extend(e.token_ids)
    layers = len(sched.kv.shelves[sched.running[-1].cache.capacity].kv)
    # Waiting for all but the last layer's array, then ceil(P / chunk) chunks, then the read-back.
    assert steps == (layers - 1) + -(-len(long_prompt) // chunk) + 1
    while sched.has_work():
        for e in sched.step():
            got[e.request_id].extend(e.token_ids)
    assert [got[short.id], got[long.id]] == expected


def test_a_request_whose_slot_fits_only_without_headroom_is_admitted_while_its_shelf_grows(loaded, monkeypatch):
    """RowCache.reserve asks for a slot with a quarter of headroom, then, if that does not fit
    the budget, for the exact one. The first attempt's compaction must not give up the exact
    slot's growth in progress, or the request would start it again at every step and wait
    for ever."""
    from mlxserve import cache as cache_module

    ids = loaded.tokenizer.encode(" ".join(["The sky is blue because of Rayleigh scattering."] * 8))[:110]
    assert len(ids) == 110  # needs a 128-token slot; with headroom (137) a 256-token one
    probe = make_scheduler(loaded, EngineConfig(block_size=8)).kv
    config = EngineConfig(block_size=8, memory_budget_bytes=probe.slot_bytes_for(128) * 3 // 2)
    params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    expected = run_alone(loaded, ids, params, block_size=8, memory_budget_bytes=config.memory_budget_bytes)
    monkeypatch.setattr(cache_module, "GROWTH_BYTES_PER_STEP", 1)  # one layer a step
    sched = make_scheduler(loaded, config)
    request = Request(ids, params)
    sched.add(request)
    tokens, steps = [], 0
    while sched.has_work():
        steps += 1
        assert steps <= 50, "the request never got its slot"
        tokens += [t for e in sched.step() for t in e.token_ids]
    assert tokens == expected


def test_cancelling_a_request_waiting_for_its_shelf_gives_the_growth_up(loaded, monkeypatch):
    """The bytes of a growth in progress come back when the request it was for is
    cancelled, even if no step follows."""
    from mlxserve import cache as cache_module

    monkeypatch.setattr(cache_module, "GROWTH_BYTES_PER_STEP", 1)
    tok = loaded.tokenizer
    sched = make_scheduler(loaded, EngineConfig(block_size=8))
    short = Request(tok.encode("Hello"), SamplingParams(max_tokens=500, temperature=0.0, ignore_eos=True))
    sched.add(short)
    sched.step()
    before = sched.kv.bytes_allocated
    long = Request(tok.encode(" ".join(["The sky is blue because of Rayleigh scattering."] * 6)), GREEDY)
    sched.add(long)
    sched.step()
    assert long in [row.request for row in sched.waiting] and sched.kv.bytes_allocated > before
    assert sched.cancel(long.id).finish_reason == "cancelled"
    assert sched.kv.bytes_allocated == before
    assert all(not shelf.growing_to and not shelf.prepared for shelf in sched.kv.shelves.values())


def buffer_address(array: mx.array) -> int:
    view = np.asarray(memoryview(array))  # no copy; dropped at return, so it holds nothing
    return view.__array_interface__["data"][0]


def test_steps_write_the_kv_shelves_in_place(loaded, monkeypatch):
    """MLX writes into an array's buffer only when nothing else holds it, queued kernels
    included; otherwise it copies the whole array (a layer's K/V shelf) for a few positions.
    So a step is queued only after the device has finished the one before, while steps
    still overlap the host's other work (the previous step's samples are read back after
    the next one is queued), and no shelf array outlives its step."""
    calls = []
    synchronize, async_eval = mx.synchronize, mx.async_eval
    monkeypatch.setattr(mx, "synchronize", lambda *a: (calls.append("wait"), synchronize(*a))[1])
    monkeypatch.setattr(mx, "async_eval", lambda *a: (calls.append("queue"), async_eval(*a))[1])
    sched = make_scheduler(loaded, EngineConfig(max_batch_tokens=16, block_size=8))
    params = SamplingParams(max_tokens=60, temperature=0.0, ignore_eos=True)
    for p in prompts(loaded.tokenizer)[:3]:
        sched.add(Request(p, params))
    while not all(row.is_decoding for row in sched.running) or sched.waiting:
        sched.step()
    sched.step()
    synchronize()
    shelves = [kv for shelf in sched.kv.shelves.values() for kv in shelf.kv]
    before = [buffer_address(kv) for kv in shelves]
    del shelves
    calls.clear()
    for _ in range(8):
        assert sched.step(), "each steady step reads back the one before it"
    synchronize()
    after = [buffer_address(kv) for shelf in sched.kv.shelves.values() for kv in shelf.kv]
    assert after == before
    assert calls == ["wait", "queue"] * 8


def _long_prompt_beside(loaded, config: EngineConfig, decoding: int):
    """A scheduler with `decoding` rows decoding, and the row of a long prompt that has
    just arrived (nothing of it prefilled yet)."""
    sched = make_scheduler(loaded, config)
    params = SamplingParams(max_tokens=200, temperature=0.0, ignore_eos=True)
    for i in range(decoding):
        sched.add(Request(loaded.tokenizer.encode(f"Hello {i}"), params))
    while not all(row.is_decoding for row in sched.running) or sched.waiting:
        sched.step()
    long = Request(list(range(1, 200)), params)
    sched.add(long)
    return sched, long


def test_the_prefill_budget_follows_the_decoding_rows(loaded):
    """Beside up to `budget_rows` decoding rows a step prefills `mixed_batch_tokens` (at most
    `max_batch_tokens`); beyond, in proportion to the rows (whole blocks); with none decoding,
    `max_batch_tokens`."""
    config = EngineConfig(max_batch_tokens=64, mixed_batch_tokens=16, budget_rows=2, block_size=8)
    sched, long = _long_prompt_beside(loaded, config, decoding=4)
    sched.step()
    row = next(r for r in sched.running if r.id == long.id)
    assert row.cache.length == 16 * 4 // 2  # 4 decoding rows, 2 per budget
    sched.cancel(sched.running[0].id)
    sched.cancel(sched.running[0].id)
    sched.step()
    assert row.cache.length == 32 + 16  # 2 decoding rows: the mixed budget
    sched.cancel(sched.running[0].id)
    sched.cancel(sched.running[0].id)
    sched.step()
    assert row.cache.length == 48 + 64  # alone: the most a step takes
    # max_batch_tokens below mixed_batch_tokens bounds the mixed budget, which grows from there.
    sched, long = _long_prompt_beside(loaded, replace(config, max_batch_tokens=8), decoding=4)
    sched.step()
    assert next(r for r in sched.running if r.id == long.id).cache.length == 8 * 4 // 2


def test_a_step_in_which_no_row_decodes_takes_a_bigger_budget_on_a_gpu_only(monkeypatch):
    """On the CPU a bigger chunk only computes more masked attention scores."""
    assert EngineConfig().max_batch_tokens == EngineConfig().mixed_batch_tokens == 512
    monkeypatch.setattr(scheduler_module.mx, "default_device", lambda: mx.gpu)
    assert EngineConfig().max_batch_tokens == scheduler_module.GPU_MAX_BATCH_TOKENS == 2048
    assert EngineConfig(max_batch_tokens=64).max_batch_tokens == 64


def test_a_first_token_comes_back_in_the_step_that_samples_it(loaded):
    """With no row decoding there is nothing to overlap with: the step that finishes a
    prompt reads its first token back at once instead of one step later."""
    sched = make_scheduler(loaded, EngineConfig(block_size=8))
    request = Request(loaded.tokenizer.encode("Hello"), GREEDY)
    sched.add(request)
    assert [e.request_id for e in sched.step()] == [request.id]


def test_budget_leftovers_smaller_than_a_block_are_not_handed_out(loaded):
    """After one prompt's chunk, a leftover below one block would cut another prompt into an
    odd-sized sliver: that prompt waits for the next step and then gets a whole chunk."""
    sched = make_scheduler(loaded, EngineConfig(max_batch_tokens=16, block_size=8))
    first = Request(list(range(1, 13)), GREEDY)  # 12 tokens: 4 left of the budget
    second = Request(list(range(101, 141)), GREEDY)  # 40 tokens (none shared: it need not wait for the first's)
    sched.add(first)
    sched.add(second)
    sched.step()
    rows = {row.id: row for row in sched.running}
    assert rows[first.id].cache.length == 12
    assert rows[second.id].cache.length == 0
    sched.step()
    assert rows[second.id].cache.length == 16


def test_chunks_deep_in_a_long_prompt_shrink_while_rows_decode(loaded, monkeypatch):
    """Next to a decoding row, a chunk past FULL_CHUNK_KEYS keys shrinks in proportion to
    the keys it attends over (a power-of-two number of blocks); alone, it keeps the budget."""
    monkeypatch.setattr(scheduler_module, "FULL_CHUNK_KEYS", 32)
    sched = make_scheduler(loaded, EngineConfig(max_batch_tokens=32, block_size=8))
    long_prompt = list(range(1, 201))
    sched.add(Request(long_prompt, SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)))
    sched.step()
    assert sched.running[0].cache.length == 32  # alone: a full chunk, however deep
    sched.step()
    assert sched.running[0].cache.length == 64
    sched.cancel(sched.running[0].id)

    short = Request([5, 6, 7], SamplingParams(max_tokens=500, temperature=0.0, ignore_eos=True))
    sched.add(short)
    sched.step()  # its first token: it decodes from now on
    other_prompt = list(range(300, 500))  # not in the prefix cache
    sched.add(Request(other_prompt, SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)))
    lengths = []
    for _ in range(5):
        sched.step()
        lengths.append(next(r for r in sched.running if r.id != short.id).cache.length)
    # 32 keys: full; then 32*32/64 = 16 tokens, 32*32/80 -> 12 -> 8 (a block), then 8 each.
    assert lengths == [32, 48, 56, 64, 72]


def test_memory_budget_queues_and_preempts_without_changing_output(loaded):
    plist = prompts(loaded.tokenizer)
    params = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
    alone = [run_alone(loaded, p, params) for p in plist]
    # Room for one slot the longest row needs and a little more: rows must wait, and rows that
    # outgrow their slot while others run must be preempted.
    longest = max(len(p) for p in plist) + params.max_tokens
    budget = _token_bytes(loaded) * (_capacity(longest) + _capacity(longest) // 2)
    cfg = EngineConfig(max_batch_tokens=64, block_size=4, memory_budget_bytes=budget)
    with Engine(loaded, cfg) as engine:
        outputs = run_together(engine, plist, params)
        stats = engine.stats()
    assert outputs == alone
    assert stats["preemptions"] > 0
    assert stats["kv_bytes_in_use"] == 0


def test_cancel_frees_memory(loaded):
    with Engine(loaded, EngineConfig(block_size=4)) as engine:
        params = SamplingParams(max_tokens=10_000, temperature=0.0, ignore_eos=True)
        stream = engine.submit(Request(loaded.tokenizer.encode("Hello"), params))
        events = iter(stream)
        next(events)
        assert engine.stats()["kv_bytes_in_use"] > 0
        stream.cancel()
        assert list(events)[-1].finish_reason == "cancelled"
        # Stats are published before the final event is delivered.
        assert engine.stats()["kv_bytes_in_use"] == 0
        assert engine.stats()["running"] == 0


def test_stop_strings_and_stop_tokens(loaded):
    prompt = loaded.tokenizer.encode("The capital of France is")
    tokens = run_alone(loaded, prompt)
    full_text = loaded.tokenizer.decode(tokens)
    # pick a stop string from the middle of the greedy output
    stop = full_text[len(full_text) // 2 : len(full_text) // 2 + 3]
    with Engine(loaded) as engine:
        events = engine.generate(prompt, SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True, stop=(stop,)))
        text = "".join(e.text for e in events)
        assert events[-1].finish_reason == "stop"
        assert text == full_text[: full_text.index(stop)]
        events = engine.generate(prompt, SamplingParams(max_tokens=16, temperature=0.0, stop_token_ids=(tokens[3],)))
        assert [t for e in events for t in e.token_ids] == tokens[: tokens.index(tokens[3]) + 1]
        assert events[-1].finish_reason == "stop"


def test_a_stop_string_found_in_the_text_released_at_the_end_stops_the_answer(loaded):
    """The last token's incomplete character becomes U+FFFD only when the answer ends (here at
    max_tokens): a stop string it completes cuts the text there, and the answer ends "stop",
    as wherever else a stop string cuts it (it ended "length", cut all the same)."""
    tokenizer = loaded.tokenizer
    lead = next(i for i in range(tokenizer.vocab_size) if tokenizer.token_bytes(i) == b"\xe6")  # a 3-byte character's first
    prompt = tokenizer.encode("Hello")
    forced = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True, logit_bias=((lead, 100.0),))
    with Engine(loaded) as engine:
        events = engine.generate(prompt, forced)
        assert [t for e in events for t in e.token_ids] == [lead]
        assert "".join(e.text for e in events) == "\ufffd" and events[-1].finish_reason == "length"
        events = engine.generate(prompt, replace(forced, stop=("\ufffd",)))
        assert "".join(e.text for e in events) == ""
        assert events[-1].finish_reason == "stop"


def test_seeded_sampling_is_reproducible_across_batches(loaded):
    plist = prompts(loaded.tokenizer)
    seeded = SamplingParams(max_tokens=20, temperature=1.0, seed=1234, ignore_eos=True)
    alone = run_alone(loaded, plist[1], seeded)
    with Engine(loaded) as engine:
        others = [engine.submit(Request(p, SamplingParams(max_tokens=20, temperature=1.0, ignore_eos=True))) for p in plist]
        together = [t for e in engine.submit(Request(plist[1], seeded)) for t in e.token_ids]
        for s in others:
            list(s)
    assert together == alone
    other_seed = run_alone(loaded, plist[1], SamplingParams(max_tokens=20, temperature=1.0, seed=99, ignore_eos=True))
    assert other_seed != alone


def test_bad_requests_are_rejected_clearly(loaded):
    with Engine(loaded) as engine:
        with pytest.raises(ValueError, match="max_tokens"):
            engine.submit(Request([1, 2], SamplingParams(max_tokens=0)))
        with pytest.raises(ValueError, match="prompt"):
            engine.submit(Request([], SamplingParams()))
        # the engine still serves afterwards
        assert engine.generate([1, 2], SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True))[-1].completion_tokens == 2


def test_prompts_as_long_as_the_context_finish_and_longer_ones_are_refused(loaded):
    import dataclasses
    from concurrent.futures import ThreadPoolExecutor

    short = dataclasses.replace(loaded, context_length=40)
    with Engine(short, EngineConfig(block_size=8)) as engine, ThreadPoolExecutor(1) as pool:
        with pytest.raises(ValueError, match="41 tokens, more than the model's context of 40"):
            engine.submit(Request(list(range(1, 42)), GREEDY))

        def finished(request):
            """The request's events; a row that never finishes fails the test (cancelled)."""
            stream = engine.submit(request)
            events = pool.submit(list, stream)
            try:
                return events.result(timeout=120)
            except TimeoutError:
                stream.cancel()
                pytest.fail(f"a {len(request.prompt_ids)}-token prompt never finished")

        def generated(n):
            events = finished(Request(list(range(1, n + 1)), GREEDY))
            return sum(len(e.token_ids) for e in events), events[-1].finish_reason

        assert generated(38) == (2, "length")
        assert generated(39) == (1, "length")
        assert generated(40) == (1, "length")  # the whole context prefilled, then its one token
        final = finished(Request(list(range(1, 41)), SamplingParams(max_tokens=1), prompt_logprobs=0,
                                 score_only=True))[-1]
        assert final.finish_reason == "length" and len(final.prompt_logprobs) == 40


def test_ctrl_c_while_the_engine_warms_up_stops_its_thread_first(loaded):
    """A process must not exit while the engine thread is inside MLX (it aborts): Ctrl-C
    during start() stops the thread before the interrupt goes on."""
    import threading

    class InterruptedWait(threading.Event):
        def wait(self, timeout=None):
            raise KeyboardInterrupt

    engine = Engine(loaded)
    engine._ready = InterruptedWait()
    try:
        with pytest.raises(KeyboardInterrupt):
            engine.start()
        assert engine._done.is_set() and not engine.alive
    finally:
        engine.stop()


def test_queue_bound_returns_busy_error(loaded):
    """Beyond max_running + max_waiting outstanding requests, submit refuses at once; the
    accepted ones finish, and room opens again afterwards."""
    from mlxserve.scheduler import ServerBusy

    with Engine(loaded, EngineConfig(max_running=1, max_waiting=1)) as engine:
        params = SamplingParams(max_tokens=50, temperature=0.0, ignore_eos=True)
        accepted = [engine.submit(Request([1, 2, 3], params)) for _ in range(2)]
        with pytest.raises(ServerBusy, match="busy"):
            engine.submit(Request([1, 2, 3], params))
        assert engine.stats()["requests_in_progress"] == 2  # (counted when submitted)
        assert [list(s)[-1].finish_reason for s in accepted] == ["length", "length"]
        assert engine.stats()["requests_in_progress"] == 0  # (counted out before the end is read)
        assert engine.generate([1, 2, 3], params)[-1].finish_reason == "length"


def test_a_cancelled_request_is_counted_out_at_once(loaded):
    """requests_in_progress drops when a request is cancelled (a client gone), not when the
    engine takes the cancellation after its step in flight (on a CPU a prompt chunk takes tens
    of seconds); a request let in by the room that makes is still added after the cancelled
    one's row is freed, not refused as busy."""
    import threading

    with Engine(loaded, EngineConfig(max_running=1, max_waiting=1, block_size=4)) as engine:
        scheduler = engine._scheduler
        step, in_step, go_on = scheduler.step, threading.Event(), threading.Event()

        def held_step():  # the engine thread waits in its first step until go_on
            in_step.set()
            go_on.wait()
            return step()

        scheduler.step = held_step
        long = SamplingParams(max_tokens=10_000, temperature=0.0, ignore_eos=True)
        short = SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True)
        try:
            cancelled = engine.submit(Request([1, 2, 3], long))
            waiting = engine.submit(Request([1, 2, 3], short))
            assert in_step.wait(60), "the engine never stepped"
            cancelled.cancel()
            assert engine.stats()["requests_in_progress"] == 1
            cancelled.cancel()  # (counted out once)
            let_in = engine.submit(Request([4, 5, 6], short))  # no longer busy
            assert engine.stats()["requests_in_progress"] == 2
        finally:
            go_on.set()  # (also for a failure: the engine must end its step to stop)
        assert list(cancelled)[-1].finish_reason == "cancelled"
        assert [list(s)[-1].finish_reason for s in (waiting, let_in)] == ["length", "length"]
        assert engine.stats()["requests_in_progress"] == 0


def _token_bytes(loaded):
    layers, heads, dim = loaded.model.kv_shape()
    return 2 * layers * heads * dim * 4  # float32


def _capacity(tokens, block_size=4):
    """The slot size a row of `tokens` tokens gets (KVStore.capacity_for)."""
    capacity = 4 * block_size
    while capacity < tokens:
        capacity *= 2
    return capacity


def test_penalty_rows_and_pipelined_rows_together_match_alone(loaded):
    """A row with penalties makes steps synchronous; rows around it must not notice."""
    plist = prompts(loaded.tokenizer)
    params = [
        SamplingParams(max_tokens=15, temperature=0.0, repetition_penalty=1.3, ignore_eos=True),
        SamplingParams(max_tokens=15, temperature=0.8, seed=5, ignore_eos=True),
        SamplingParams(max_tokens=15, temperature=0.0, presence_penalty=1.0, frequency_penalty=0.5, ignore_eos=True),
        SamplingParams(max_tokens=25, temperature=0.0, ignore_eos=True),
    ]
    alone = [run_alone(loaded, p, sp) for p, sp in zip(plist, params)]
    with Engine(loaded, EngineConfig(max_batch_tokens=16, block_size=8)) as engine:
        streams = [engine.submit(Request(p, sp)) for p, sp in zip(plist, params)]
        together = [[t for e in s for t in e.token_ids] for s in streams]
    assert together == alone
    # the penalties really act: without them the first row differs
    plain = run_alone(loaded, plist[0], SamplingParams(max_tokens=15, temperature=0.0, ignore_eos=True))
    assert plain != alone[0]


def test_with_room_for_k_rows_the_next_one_waits(loaded):
    """Admission by memory: prompts reserve a slot; one that does not fit waits for memory
    instead of preempting anyone, and runs once a row finishes."""
    tok = loaded.tokenizer
    prompt = tok.encode("Once upon a time there was a tiny model that generated text.")
    slot = _capacity(len(prompt) + len(prompt) // 4)  # reserve() asks for a quarter of headroom
    assert len(prompt) + 2 <= slot  # prompt + the generated tokens fit without moving
    k = 3
    # Room for k slots, one token short of a k+1-th.
    cfg = EngineConfig(block_size=4, memory_budget_bytes=((k + 1) * slot - 1) * _token_bytes(loaded),
                       prefix_cache=False)
    sched = make_scheduler(loaded, cfg)
    params = SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True)
    requests = [Request(list(prompt), params) for _ in range(k + 1)]
    for r in requests:
        sched.add(r)
    sched.step()
    assert len(sched.running) == k and len(sched.waiting) == 1
    assert sched.waiting[0].request is requests[-1]
    done = set()
    while sched.has_work():
        done |= {e.request_id for e in sched.step() if e.finish_reason == "length"}
    assert done == {r.id for r in requests}
    assert sched.stats.preemptions == 0


def test_a_request_waiting_for_memory_counts_in_the_prefix_stats_once(loaded):
    prompt = loaded.tokenizer.encode("Once upon a time there was a tiny model that generated text.")
    slot = _capacity(len(prompt) + len(prompt) // 4)
    cfg = EngineConfig(block_size=4, memory_budget_bytes=(2 * slot - 1) * _token_bytes(loaded))  # one slot
    sched = make_scheduler(loaded, cfg)
    params = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
    for _ in range(2):
        sched.add(Request(list(prompt), params))
    steps = 0
    while sched.has_work():
        sched.step()
        steps += 1
    assert steps > 4  # the second request waited, looking the prefix up at each step
    assert sched.prefix.stats.queried_tokens == 2 * len(prompt)
    assert sched.prefix.stats.hit_tokens == (len(prompt) - 1) // 4 * 4  # the second reused the first's blocks


def test_stats_report_rates_and_memory(loaded):
    with Engine(loaded) as engine:
        prompt = loaded.tokenizer.encode("Hello world")
        engine.generate(prompt, SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True))
        stats = engine.stats()
    assert stats["prefix_queried_tokens"] == len(prompt)  # the engine's warm-up is not counted
    for key in ("running", "waiting", "prefill_tok_s", "decode_tok_s", "kv_bytes_in_use", "kv_bytes_budget",
                "prefix_hit_rate", "preemptions"):
        assert key in stats
    assert stats["decode_tok_s"] > 0 and stats["prefill_tok_s"] > 0
    assert stats["kv_bytes_budget"] > 0


@pytest.mark.parametrize("end", ["stop token", "stop string", "cancelled", "budget"])
def test_decode_tokens_count_only_the_answers_tokens(loaded, end):
    """Steps are pipelined: a decoding row's next token is fed, and counted as decoded, while
    the token before it is read back. When that one ends the answer (a stop token or string),
    or the request is cancelled meanwhile, the token in flight is no part of the answer; the
    counter leaves it out, as it leaves out draft tokens after a stop (test_spec.py). It
    counted it: one more than the answer's tokens but the first. (Likewise for a lone row that the
    budget stops with a token in flight: it ends without that token, see
    test_a_lone_row_that_outgrows_the_budget_ends_with_length_keeping_its_output.)"""
    prompt = loaded.tokenizer.encode("The capital of France is")
    full = run_alone(loaded, prompt, replace(GREEDY, max_tokens=40), block_size=4)
    params, budget = replace(GREEDY, max_tokens=40), None
    if end == "stop token":
        at = next(i for i in range(3, len(full)) if full[i] not in full[:i])
        params = replace(params, stop_token_ids=(full[at],))
    elif end == "stop string":
        text = loaded.tokenizer.decode(full)
        params = replace(params, stop=(text[len(text) // 2 : len(text) // 2 + 3],))
    elif end == "budget":
        budget = make_scheduler(loaded, EngineConfig(block_size=4)).kv.slot_bytes_for(32)  # one 32-token slot
    sched = make_scheduler(loaded, EngineConfig(block_size=4, memory_budget_bytes=budget))
    request = Request(prompt, params)
    sched.add(request)
    tokens, final = [], None
    while sched.has_work():
        for event in sched.step():
            tokens += event.token_ids
            final = event if event.finish_reason else final
        if end == "cancelled" and len(tokens) == 6 and final is None:
            assert sched._inflight is not None  # its next token is being computed
            final = sched.cancel(request.id)
    assert tokens == full[: len(tokens)] and 3 < len(tokens) < len(full)
    assert final.finish_reason == {"stop token": "stop", "stop string": "stop"}.get(end, "length" if budget else end)
    assert sched.stats.decode_tokens == len(tokens) - 1


@pytest.mark.parametrize("chunk", [3, 7, 512])
def test_prompt_scoring_equals_a_direct_forward_pass(loaded, chunk):
    prompt = loaded.tokenizer.encode("The capital of France is Paris. The sky is blue because of Rayleigh scattering.")
    expected = reference_prompt_logprobs(loaded, prompt)
    with Engine(loaded, EngineConfig(max_batch_tokens=chunk, block_size=4)) as engine:
        # a plain request first, so that the prefix cache holds this prompt: scoring must not use it
        engine.generate(prompt, SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True))
        events = list(engine.submit(Request(prompt, SamplingParams(max_tokens=1), prompt_logprobs=2, score_only=True)))
    final = events[-1]
    assert final.finish_reason == "length" and final.completion_tokens == 0
    scores = final.prompt_logprobs
    assert len(scores) == len(prompt) and scores[0] is None
    for i, entry in enumerate(scores[1:]):
        assert entry.token_id == prompt[i + 1]
        assert abs(entry.logprob - expected[i, prompt[i + 1]].item()) < 1e-4
        best = sorted(range(expected.shape[1]), key=lambda t: -expected[i, t].item())[:2]
        assert [t for t, _ in entry.top] == best


def test_prompt_scoring_alongside_generation(loaded):
    prompt = loaded.tokenizer.encode("Once upon a time there was a tiny model.")
    expected = reference_prompt_logprobs(loaded, prompt)
    with Engine(loaded) as engine:
        params = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)
        events = list(engine.submit(Request(prompt, params, prompt_logprobs=0)))
        alone = engine.generate(prompt, SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True))
    assert [t for e in events for t in e.token_ids] == [t for e in alone for t in e.token_ids]
    scores = events[-1].prompt_logprobs
    assert len(scores) == len(prompt)
    assert all(abs(s.logprob - expected[i, prompt[i + 1]].item()) < 1e-4 for i, s in enumerate(scores[1:]))


def test_asyncio_streams_get_every_event_and_a_closed_loop_harms_no_one(loaded):
    import asyncio

    plist = prompts(loaded.tokenizer)
    expected = [run_alone(loaded, p) for p in plist[:3]]
    with Engine(loaded, EngineConfig()) as engine:
        async def consume_all():
            loop = asyncio.get_running_loop()
            streams = [engine.submit(Request(p, GREEDY), loop) for p in plist[:3]]
            return [[t async for e in s for t in e.token_ids] for s in streams]

        # Several streams of one loop: a step's events arrive together, each stream in order.
        assert asyncio.run(consume_all()) == expected

        # A client's loop goes away while its request still runs (never consumed)...
        async def abandon():
            engine.submit(Request(plist[3], SamplingParams(max_tokens=200, temperature=0.0, ignore_eos=True)),
                          asyncio.get_running_loop())

        asyncio.run(abandon())
        # ...and the engine goes on serving others.
        assert [t for e in engine.generate(plist[0], GREEDY) for t in e.token_ids] == expected[0]


def test_objects_that_exist_at_start_are_out_of_the_collectors_view(loaded):
    """A full garbage collection visits every tracked object; while an engine runs, what
    existed when it started (modules, the model) is out of later collections, and the
    garbage there was then has been collected (engine.settle_garbage_collector)."""
    import gc
    import weakref

    class Node:
        pass

    before = [object()]  # a container the collector tracks
    cycle = Node()
    cycle.self = cycle  # garbage once deleted, which only a collection frees
    cycle_ref = weakref.ref(cycle)
    del cycle
    assert any(o is before for o in gc.get_objects())
    with Engine(loaded) as engine:
        assert not any(o is before for o in gc.get_objects())
        assert cycle_ref() is None  # collected, not kept for good
        after = [object()]
        assert any(o is after for o in gc.get_objects())
        assert engine.generate(loaded.tokenizer.encode("Hello"), GREEDY)[-1].finish_reason == "length"


def test_a_model_dropped_after_its_engine_stops_is_freed():
    """The engine's freeze of the collector ends with it: a model (whose layers and compiled
    functions refer to each other) dropped after its engine stopped is collected."""
    import gc
    import weakref

    from mlxserve.random_weights import build_random_model

    model = build_random_model("tiny", dtype="float32")
    model_ref = weakref.ref(model.model.layers[0])  # a layer: it is in the reference cycle
    with Engine(model) as engine:
        assert engine.generate([1, 2, 3], GREEDY)[-1].finish_reason == "length"
    del model, engine
    gc.collect()
    assert model_ref() is None


# ---- the KV budget's limits -------------------------------------------------------------
def _slot_bytes(loaded, tokens):
    return _token_bytes(loaded) * _capacity(tokens)


def test_a_budget_below_one_slot_is_refused_at_start(loaded):
    with pytest.raises(RuntimeError, match="smaller than one 16-token slot"):
        Engine(loaded, EngineConfig(block_size=4, memory_budget_bytes=_slot_bytes(loaded, 16) - 1)).start()
    # Sizes as doctor and pull write them: a 1KB budget reads 1.0 kB, not 0.00 MB.
    with pytest.raises(ValueError, match=r"budget is 1\.0 kB, smaller"):
        make_scheduler(loaded, EngineConfig(block_size=4, memory_budget_bytes=1000))


def test_a_prompt_whose_slot_exceeds_the_budget_is_refused_at_submit(loaded):
    """Refused at once, not left waiting for memory that can never come."""
    prompt = list(range(1, 25))  # a 32-token slot
    with Engine(loaded, EngineConfig(block_size=4, memory_budget_bytes=_slot_bytes(loaded, 16))) as engine:
        with pytest.raises(scheduler_module.PromptExceedsMemory, match="the prompt has 24 tokens"):
            engine.submit(Request(prompt, GREEDY))
        assert engine.generate(prompt[:8], GREEDY)[-1].finish_reason == "length"  # the engine goes on


def test_a_lone_row_that_cannot_hold_two_slots_moves_by_recomputing(loaded):
    """Room for the 64-token slot the row ends in, not for it and the 32-token slot it grows
    from at once: the row gives its slot up and recomputes, and its output is unchanged."""
    prompt = loaded.tokenizer.encode("Hello")
    params = SamplingParams(max_tokens=48, temperature=0.0, ignore_eos=True)
    alone = run_alone(loaded, prompt, params, block_size=4)
    cfg = EngineConfig(block_size=4, memory_budget_bytes=_slot_bytes(loaded, 64))
    with Engine(loaded, cfg) as engine:
        events = engine.generate(prompt, params)
        stats = engine.stats()
    assert [t for e in events for t in e.token_ids] == alone
    assert events[-1].finish_reason == "length" and events[-1].completion_tokens == 48
    assert stats["preemptions"] >= 1


def test_a_lone_row_that_outgrows_the_budget_ends_with_length_keeping_its_output(loaded):
    prompt = loaded.tokenizer.encode("Hello")
    params = SamplingParams(max_tokens=48, temperature=0.0, ignore_eos=True)
    alone = run_alone(loaded, prompt, params, block_size=4)
    with Engine(loaded, EngineConfig(block_size=4, memory_budget_bytes=_slot_bytes(loaded, 32))) as engine:
        events = engine.generate(prompt, params)
        stats = engine.stats()
    generated = [t for e in events for t in e.token_ids]
    assert events[-1].finish_reason == "length" and events[-1].error is None
    # As far as a 32-token slot goes, and the token sampled at its last position (never fed,
    # it needs no place): the one in flight when the budget stopped the row, read back.
    assert len(prompt) + len(generated) == 32 + 1
    assert generated == alone[: len(generated)]
    assert stats["kv_bytes_in_use"] == 0


def test_abort_all_ends_streams_while_the_engine_is_inside_a_step(loaded, monkeypatch):
    """A server shutting down must answer its clients now, not after a step that on a slow
    machine can take many seconds (the engine reads its commands only between steps)."""
    from concurrent.futures import ThreadPoolExecutor

    inside, release = _hold_steps(monkeypatch)
    with Engine(loaded, EngineConfig(block_size=4)) as engine, ThreadPoolExecutor(1) as pool:
        params = SamplingParams(max_tokens=10_000, temperature=0.0, ignore_eos=True)
        events = iter(engine.submit(Request(loaded.tokenizer.encode("Hello"), params)))
        assert next(events).token_ids  # it runs
        release.clear()
        try:
            assert inside.wait(30)
            engine.abort_all("server is shutting down")
            rest = pool.submit(lambda: list(events)).result(timeout=10)  # not waiting for the step
        finally:
            release.set()
        assert rest[-1].finish_reason == "error" and rest[-1].error == "server is shutting down"
    # The engine freed the row after that step: stop() returned, so it has handled the abort.
    assert engine.stats()["running"] == 0 and engine.stats()["kv_bytes_in_use"] == 0


def test_a_preempted_scoring_request_scores_each_prompt_token_once(loaded):
    """Preempted and recomputed, a request with prompt_logprobs keeps one entry per prompt
    token (the recompute scored the prompt again, appending a second copy)."""
    budget = _token_bytes(loaded) * 80
    sched = make_scheduler(loaded, EngineConfig(block_size=4, memory_budget_bytes=budget))
    first = Request(list(range(10, 20)), SamplingParams(max_tokens=50, temperature=0.0, ignore_eos=True))
    scored = Request(list(range(30, 44)), SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True),
                     prompt_logprobs=0)
    sched.add(first)
    sched.add(scored)
    finals = {}
    while sched.has_work():
        finals.update({e.request_id: e for e in sched.step() if e.finish_reason})
    assert sched.stats.preemptions > 0
    entries = finals[scored.id].prompt_logprobs
    assert [None if e is None else e.token_id for e in entries] == [None] + scored.prompt_ids[1:]
    expected = reference_prompt_logprobs(loaded, scored.prompt_ids)
    for i, entry in enumerate(entries[1:]):
        assert abs(entry.logprob - expected[i, scored.prompt_ids[i + 1]].item()) < 1e-4


def test_a_request_preempted_in_its_prefill_counts_once_in_the_prefix_stats(loaded):
    budget = _token_bytes(loaded) * 96
    sched = make_scheduler(loaded, EngineConfig(block_size=4, max_batch_tokens=4, memory_budget_bytes=budget))
    a = Request(list(range(10, 22)), SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True))
    sched.add(a)
    sched.step()  # a decodes
    b = Request(list(range(100, 140)), SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True))
    sched.add(b)  # b prefills 4 tokens a step while a outgrows its slot
    while sched.has_work():
        sched.step()
    stats = sched.snapshot_stats()
    assert stats["preemptions"] > 0
    assert stats["prefix_queried_tokens"] == len(a.prompt_ids) + len(b.prompt_ids)


def test_a_chat_turn_that_fits_alone_runs_when_its_cached_prefix_and_its_slot_do_not_fit_together(loaded):
    """A budget of one 256-token slot: turn 2 (188 tokens) cannot take over turn 1's kept
    128-token slot and grow into a 256-token one beside it, so it starts in a fresh slot and
    recomputes the prefix, as it does without the cache (it was failed as "does not fit")."""
    params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    outputs = {}
    for prefix_cache in (False, True):
        sched = make_scheduler(loaded, EngineConfig(block_size=4, prefix_cache=prefix_cache,
                                                    memory_budget_bytes=_token_bytes(loaded) * 256))

        def run(prompt):
            sched.add(Request(prompt, params))
            events = []
            while sched.has_work():
                events += sched.step()
            return [t for e in events for t in e.token_ids], events[-1]

        turn1 = list(range(10, 110))
        answer, _ = run(turn1)
        outputs[prefix_cache] = run(turn1 + answer + list(range(120, 200)))
    tokens, final = outputs[True]
    assert final.finish_reason == "length" and final.error is None
    assert tokens == outputs[False][0]


def test_a_request_submitted_while_the_engine_stops_gets_a_final_event(loaded, monkeypatch):
    """stop() waits for the step in progress; a submit() in that time was accepted and its
    stream never ended. One step is held so that the order is certain."""
    import threading

    inside, release = _hold_steps(monkeypatch)
    engine = Engine(loaded, EngineConfig(block_size=4)).start()
    first = engine.submit(Request([5, 6, 7], SamplingParams(max_tokens=10_000, temperature=0.0, ignore_eos=True)))
    first._queue.get(timeout=60)  # it runs
    release.clear()
    assert inside.wait(60)  # the engine is inside a step
    stopper = threading.Thread(target=engine.stop)
    stopper.start()
    while not engine._stopping:
        pass
    try:
        late = engine.submit(Request([8, 9], SamplingParams(max_tokens=2, temperature=0.0)))
    except RuntimeError as exc:  # refused: as good as an ending stream
        late = None
        assert "not running" in str(exc)
    release.set()
    stopper.join(60)
    if late is not None:
        final = late._queue.get(timeout=60)
        assert final.finish_reason == "error"
    with pytest.raises(RuntimeError, match="not running"):
        engine.submit(Request([8, 9], SamplingParams(max_tokens=2, temperature=0.0)))


def test_abort_all_ends_every_stream_when_one_belongs_to_a_closed_event_loop(loaded):
    import asyncio

    with Engine(loaded, EngineConfig(block_size=4)) as engine:
        long = SamplingParams(max_tokens=100_000, temperature=0.0, ignore_eos=True)

        async def abandon():  # a client's loop goes away while its request runs
            engine.submit(Request([5, 6, 7], long), asyncio.get_running_loop())

        asyncio.run(abandon())
        threaded = engine.submit(Request([8, 9, 10], long))
        threaded._queue.get(timeout=60)
        engine.abort_all("server is shutting down")  # raised 'Event loop is closed'
        events = list(threaded)
    assert events[-1].finish_reason == "error" and events[-1].error == "server is shutting down"


def _hold_steps(monkeypatch):
    """(inside, release): while `release` is clear, the engine's next step waits for it,
    setting `inside` first. Released to begin with."""
    import threading

    inside, release = threading.Event(), threading.Event()
    release.set()
    step = scheduler_module.Scheduler.step

    def held_step(self):
        if not release.is_set():
            inside.set()
            release.wait()
        return step(self)

    monkeypatch.setattr(scheduler_module.Scheduler, "step", held_step)
    return inside, release


def test_decoding_steps_skip_the_wait_only_where_copies_are_cheap(loaded, monkeypatch):
    """Where the scheduler queues a step while the previous one runs (CUDA, small shelves:
    Scheduler._copies_are_cheap, forced on here), steps of decoding rows only do not wait for
    the device, other steps (prefill) still do, shelves over the limit bring every wait back,
    and the output is the same in each case."""
    plist = prompts(loaded.tokenizer)[:3]
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)

    def run(queue_without_wait: bool, limit: int):
        monkeypatch.setattr(scheduler_module, "QUEUE_WITHOUT_WAIT_BYTES", limit)
        sched = make_scheduler(loaded, EngineConfig(block_size=8))
        sched._queue_without_wait = queue_without_wait
        waits, decoding_steps = [], 0
        real = sched._wait_for_device

        def counted(skip=False):
            waits.append(not skip and sched._queued)
            real(skip)

        monkeypatch.setattr(sched, "_wait_for_device", counted)
        requests = [Request(p, params) for p in plist]
        for r in requests:
            sched.add(r)
        out = {r.id: [] for r in requests}
        while sched.has_work():
            decoding_steps += all(row.is_decoding for row in sched.running) and not sched.waiting
            for event in sched.step():
                out[event.request_id] += event.token_ids
        return [out[r.id] for r in requests], sum(waits), decoding_steps

    sched = make_scheduler(loaded, EngineConfig(block_size=8))
    sched._queue_without_wait = True
    sched.add(Request(plist[0], params))
    sched.step()  # (the prompt: a slot on a shelf)
    row = sched.running[0]
    assert sched._copies_are_cheap(1, [row])  # decoding only
    assert not sched._copies_are_cheap(0, [row])  # a prefill chunk
    assert not sched._copies_are_cheap(1, [row, row])  # one decoding row, one prefilling
    assert not sched._copies_are_cheap(0, [])

    waiting, waited, _ = run(False, 1 << 30)
    queued, waited_less, decoding_steps = run(True, 1 << 30)
    over_the_limit, waited_again, _ = run(True, 0)
    assert queued == waiting == over_the_limit
    assert decoding_steps >= 8 and waited_less <= waited - decoding_steps + 1
    assert waited_again == waited
