"""The shared prefix cache: reuse, LRU eviction by bytes, holders, and output equivalence."""

import mlx.core as mx
import pytest

from mlxserve.cache import KVStore, OutOfKVMemory, RowCache
from mlxserve.engine import Engine, EngineConfig, make_scheduler
from mlxserve.loader import load_model
from mlxserve.prefix_cache import KeptSlot, PrefixCache, common_prefix_length
from mlxserve.sampling import SamplingParams
from mlxserve.scheduler import Request
from test_engine import run_alone

BS = 4
SLOT = 4 * BS  # the smallest slot: 16 tokens


def store(max_slots=None):
    kv = KVStore(1, 1, 8, mx.float32, block_size=BS)
    if max_slots is not None:
        kv.max_bytes = max_slots * SLOT * kv.bytes_per_token
    return kv


def row_with(kv, tokens, cache=None):
    """A row whose slot holds `tokens` (structure only: nothing is computed)."""
    row = RowCache(kv)
    row.reserve(len(tokens))
    row.extend(len(tokens))
    if cache is not None:
        cache.insert(tokens, row, row.length)
    return row


# ---- the structure on its own ---------------------------------------------------------------

def test_match_returns_longest_full_block_prefix_and_leaves_one_token():
    kv = store()
    cache = PrefixCache(kv)
    tokens = list(range(10))  # 2 full blocks + 2 tokens
    row = row_with(kv, tokens, cache)
    assert cache.cached_blocks == 2
    m = cache.match(tokens + [99, 98])
    assert m.length == 8 and m.holder is row
    # exactly two blocks long: one token must stay unfed, so only one block matches
    assert cache.match(tokens[:8]).length == 4
    assert cache.match([7] + tokens[1:]).length == 0  # differs in the first block
    assert cache.stats.hit_tokens == 0  # a lookup is counted when its request is admitted (record)


def test_next_turn_takes_the_kept_slot_over_without_copying():
    kv = store()
    cache = PrefixCache(kv)
    turn1 = list(range(13))
    row = row_with(kv, turn1, cache)
    shelf, slot = row.shelf, row.slot
    cache.release(row, turn1)  # the request finished: its slot is kept, not freed
    assert row.shelf is None and kv.bytes_in_use == 0
    assert cache.cached_bytes == SLOT * kv.bytes_per_token
    nxt = RowCache(kv)
    m = cache.match(turn1 + [50, 51])
    assert isinstance(m.holder, KeptSlot) and m.length == 13  # 3 blocks, then its 13th token
    cache.adopt(nxt, m)
    assert (nxt.shelf, nxt.slot, nxt.length) == (shelf, slot, 13)
    assert cache.cached_bytes == 0 and not cache.kept
    assert cache.match(turn1 + [50]).holder is nxt  # its blocks now belong to the new row


def test_a_match_in_a_kept_slot_goes_on_to_the_token_where_they_differ():
    """Past the last full block, the kept slot's own tokens decide, one by one: up to where the
    request differs, always leaving its last token to feed; a hybrid model's match stays on
    a block's end (its recurrent state was snapshotted only there)."""
    kv = store()
    cache = PrefixCache(kv)
    kept = list(range(11))  # 2 full blocks + 3 tokens
    row = row_with(kv, kept, cache)
    cache.release(row, kept)
    assert cache.match(kept[:10] + [99, 98]).length == 10  # differs at the 11th token
    assert cache.match(kept + [5, 6]).length == 11  # all of it
    assert cache.match(kept).length == 10  # the last token is fed again, for its logits
    assert cache.match(kept[:9]).length == 8  # a request shorter than the slot
    assert cache.match(kept + [5], need_state=True).length == 0  # no block has a snapshot
    cache.kept[next(iter(cache.kept))].states[1] = {}
    assert cache.match(kept + [5], need_state=True).length == 8


def test_common_prefix_length_counts_to_the_first_difference():
    """Within a 64-token block and past several, at either list's end, and for lists of one
    token and none: the same count as comparing token by token."""
    base = [(7 * i) % 101 for i in range(300)]
    for cut in (0, 1, 63, 64, 65, 128, 200, 299):
        other = base[:cut] + [1000] + base[cut + 1 :]
        assert common_prefix_length(base, other) == cut
        assert common_prefix_length(base[:cut], base) == cut == common_prefix_length(base, base[:cut])
    assert common_prefix_length(base, list(base)) == 300
    assert common_prefix_length([], base) == 0 and common_prefix_length([5], [5]) == 1


def test_copy_from_a_running_row_and_trim_forgets_blocks():
    kv = store()
    cache = PrefixCache(kv)
    tokens = list(range(12))
    running = row_with(kv, tokens, cache)
    other = RowCache(kv)
    cache.adopt(other, cache.match(tokens + [1]))
    assert other.slot != running.slot and other.length == 12
    running.trim(5)  # e.g. rejected draft tokens: blocks 1 and 2 no longer hold these tokens
    assert running.block_keys == running.block_keys[:1] and len(running.block_keys) == 1
    assert cache.match(tokens + [1]).holder is other


def test_running_rows_are_never_evicted():
    kv = store(max_slots=2)
    cache = PrefixCache(kv)
    a = row_with(kv, list(range(8)), cache)
    b = row_with(kv, list(range(100, 108)), cache)
    with pytest.raises(OutOfKVMemory):
        RowCache(kv).reserve(4)  # both slots are held by running rows
    assert cache.match(list(range(9))).holder is a
    b_slot = b.slot
    cache.release(b, list(range(100, 108)))  # finished: kept, and now evictable
    newcomer = RowCache(kv)
    newcomer.reserve(4)
    assert newcomer.slot == b_slot
    assert cache.match(list(range(100, 109))).length == 0
    assert cache.stats.evicted_blocks == 2


def test_lru_eviction_by_bytes():
    kv = store(max_slots=3)
    cache = PrefixCache(kv)
    prefixes = {name: [base + i for i in range(8)] for name, base in (("a", 100), ("b", 200), ("c", 300))}
    for name in "abc":
        cache.release(row_with(kv, prefixes[name], cache), prefixes[name])
    assert cache.cached_bytes == 3 * SLOT * kv.bytes_per_token
    cache.match(prefixes["a"] + [0])  # touch "a": now "b" is the least recently used
    RowCache(kv).reserve(8)
    assert cache.match(prefixes["b"] + [0]).length == 0
    assert cache.match(prefixes["a"] + [0]).length == 8
    assert cache.match(prefixes["c"] + [0]).length == 8
    assert kv.bytes_in_use == SLOT * kv.bytes_per_token  # only the newcomer's slot counts as in use


def test_kept_slots_are_reused_before_a_shelf_grows_past_its_working_set():
    """Beyond KEPT_SLOTS_BEFORE_REUSE kept slots (or a quarter of the rows running there), a new
    row reuses the least recently used kept slot instead of growing the shelf (writes copy a
    whole shelf on back-ends that do not update in place)."""
    from mlxserve.cache import KEPT_SLOTS_BEFORE_REUSE

    kv = store()
    cache = PrefixCache(kv)
    for i in range(KEPT_SLOTS_BEFORE_REUSE):
        tokens = [100 * i + j for j in range(8)]
        cache.release(row_with(kv, tokens, cache), tokens)
    slots = kv.shelves[SLOT].num_slots
    assert len(cache.kept) == KEPT_SLOTS_BEFORE_REUSE
    RowCache(kv).reserve(8)
    assert kv.shelves[SLOT].num_slots == slots and len(cache.kept) == KEPT_SLOTS_BEFORE_REUSE - 1
    assert cache.match([j for j in range(8)] + [0]).length == 0  # the oldest went


def test_adopted_prefix_gives_the_same_logits(loaded):
    """Copying from a running row and taking over a kept slot both continue exactly."""
    from mlxserve.runner import Feed, Runner

    layers, heads, dim = loaded.model.kv_shape()
    tokens = loaded.tokenizer.encode("Once upon a time there was a tiny model that generated text.")

    def run(kv, row, toks):
        row.reserve(len(toks))
        logits, _ = Runner(loaded.model, kv).forward([Feed("r", toks, row.length, row, "last")])
        mx.eval(logits)
        row.extend(len(toks))
        return logits

    kv = KVStore(layers, heads, dim, mx.float32, block_size=BS)
    expected = run(kv, RowCache(kv), tokens)
    cache = PrefixCache(kv)
    first = RowCache(kv)
    run(kv, first, tokens)
    cache.insert(tokens, first, first.length)
    copied = RowCache(kv)
    m = cache.match(tokens)
    cache.adopt(copied, m)
    assert mx.allclose(run(kv, copied, tokens[m.length :]), expected, atol=1e-5)
    cache.release(first, tokens)
    taken = RowCache(kv)
    m = cache.match(tokens)
    assert isinstance(m.holder, KeptSlot)
    cache.adopt(taken, m)
    assert mx.allclose(run(kv, taken, tokens[m.length :]), expected, atol=1e-5)


# ---- through the scheduler --------------------------------------------------------------------

@pytest.fixture(scope="module")
def loaded(tiny_model_dir):
    return load_model(str(tiny_model_dir("qwen3", "float32")), progress=False)


GREEDY = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)


def collect(stream):
    events = list(stream)
    return [t for e in events for t in e.token_ids], events[-1]


def test_second_request_reuses_prefix_and_output_is_unchanged(loaded):
    tok = loaded.tokenizer
    system = tok.encode("You are a helpful assistant. Answer briefly and truthfully. " * 3)
    questions = [tok.encode(q) for q in (" What is the capital of France?", " Why is the sky blue?")]
    with Engine(loaded, EngineConfig(block_size=8, prefix_cache=False)) as engine:
        expected = [collect(engine.submit(Request(system + q, GREEDY)))[0] for q in questions]
    with Engine(loaded, EngineConfig(block_size=8)) as engine:
        first, first_final = collect(engine.submit(Request(system + questions[0], GREEDY)))
        second, second_final = collect(engine.submit(Request(system + questions[1], GREEDY)))
        stats = engine.stats()
    assert [first, second] == expected
    assert first_final.cached_tokens == 0
    a, b = system + questions[0], system + questions[1]
    common = next(i for i in range(min(len(a), len(b))) if a[i] != b[i])
    assert common >= len(system)
    assert second_final.cached_tokens == common  # to the token: the first's slot was kept
    assert stats["prefix_hit_tokens"] == second_final.cached_tokens
    assert stats["prefix_queried_tokens"] == len(a) + len(b)


def test_chat_second_turn_reuses_the_first_turn(loaded):
    tok = loaded.tokenizer
    turn1 = tok.encode("<|im_start|>user\nTell me a story about a tiny model.<|im_end|>\n<|im_start|>assistant\n")
    with Engine(loaded, EngineConfig(block_size=8)) as engine:
        answer, _ = collect(engine.submit(Request(turn1, GREEDY)))
        turn2 = turn1 + answer + tok.encode("<|im_end|>\n<|im_start|>user\nAnd then?<|im_end|>\n<|im_start|>assistant\n")
        _, final = collect(engine.submit(Request(turn2, GREEDY)))
    # Everything computed in turn 1 (prompt + all but the last sampled token) is reused.
    assert final.cached_tokens == len(turn1) + len(answer) - 1
    assert final.cached_tokens > len(turn1) // 2


def test_two_conversations_with_one_system_prompt_keep_each_its_history(loaded):
    """B's first turn shares only A's system prompt: it copies those blocks and leaves A's
    slot whole, so A's second turn still reuses all of A's first turn; outputs as without
    the cache."""
    tok = loaded.tokenizer
    system = tok.encode("<|im_start|>system\nYou are a helpful assistant who answers briefly.<|im_end|>\n")

    def turn(text):
        return tok.encode(f"<|im_start|>user\n{text}<|im_end|>\n<|im_start|>assistant\n")

    def conversation(engine):
        a1 = system + turn("Tell me a story about a tiny model.")
        a_answer, a_first = collect(engine.submit(Request(a1, GREEDY)))
        b1 = system + turn("What is the capital of France?")
        b_answer, b_first = collect(engine.submit(Request(b1, GREEDY)))
        a2 = a1 + a_answer + turn("And then?")
        a_next, a_second = collect(engine.submit(Request(a2, GREEDY)))
        shared = next(i for i in range(len(b1)) if a1[i] != b1[i])
        return (a_answer, b_answer, a_next), (a_first, b_first, a_second), (shared, len(a1) + len(a_answer))

    with Engine(loaded, EngineConfig(block_size=8, prefix_cache=False)) as engine:
        expected, _, _ = conversation(engine)
    with Engine(loaded, EngineConfig(block_size=8)) as engine:
        answers, finals, (shared, a_length) = conversation(engine)
    assert answers == expected
    assert shared >= len(system) and finals[1].cached_tokens == shared  # B: what it shares with A
    assert finals[2].cached_tokens == a_length - 1  # and A all of its first turn


def test_concurrent_shared_prefix_requests_match_cache_off(loaded):
    tok = loaded.tokenizer
    shared = tok.encode("Once upon a time there was a tiny model that generated text. " * 2)
    prompts = [shared + tok.encode(s) for s in (" It", " The end", " Numbers: 1 2 3", " Hello world")]
    results = {}
    for enabled in (False, True):
        with Engine(loaded, EngineConfig(block_size=4, max_batch_tokens=24, prefix_cache=enabled)) as engine:
            warm = engine.submit(Request(shared + [5], GREEDY))  # seeds the cache when enabled
            collect(warm)
            streams = [engine.submit(Request(p, GREEDY)) for p in prompts]
            results[enabled] = [collect(s)[0] for s in streams]
    assert results[True] == results[False]


def test_preempted_row_recomputes_identically_with_cache(loaded):
    tok = loaded.tokenizer
    prompts = [tok.encode(t) for t in ("Hello world! How are you today?", "def add(a, b):", "The capital of France is", "Numbers: 0 1 2 3 4 5")]
    params = SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True)
    with Engine(loaded, EngineConfig(block_size=4)) as engine:
        alone = [collect(engine.submit(Request(p, params)))[0] for p in prompts]
    layers, heads, dim = loaded.model.kv_shape()
    token_bytes = 2 * layers * heads * dim * 4
    # Room for three 32-token slots: rows outgrowing their 16-token slots must preempt others.
    sched = make_scheduler(loaded, EngineConfig(block_size=4, memory_budget_bytes=3 * 32 * token_bytes))
    requests = [Request(p, params) for p in prompts]
    for r in requests:
        sched.add(r)
    outputs = {r.id: [] for r in requests}
    while sched.has_work():
        for e in sched.step():
            outputs[e.request_id].extend(e.token_ids)
    assert [outputs[r.id] for r in requests] == alone
    assert sched.stats.preemptions > 0


def test_default_budget_comes_from_device_memory(loaded):
    from mlxserve.memory import DEVICE_MEMORY_FRACTION, device_memory_bytes, weight_bytes

    sched = make_scheduler(loaded, EngineConfig())
    expected = device_memory_bytes() * DEVICE_MEMORY_FRACTION - weight_bytes(loaded.model)
    assert 0 < sched.kv.max_bytes <= expected and sched.kv.max_bytes > expected - 1


def test_kept_slots_on_another_shelf_are_evicted_one_by_one_for_a_bigger_slot():
    kv = store(max_slots=3)  # 48 tokens' worth of bytes
    cache = PrefixCache(kv)
    prefixes = [[100 * i + j for j in range(8)] for i in range(3)]
    for p in prefixes:
        cache.release(row_with(kv, p, cache), p)
    big = RowCache(kv)
    big.reserve(20)  # a 32-token slot: two of the three kept 16-token slots must go
    assert big.capacity == 32 and kv.bytes_allocated <= kv.max_bytes
    assert [cache.match(p + [0]).length for p in prefixes] == [0, 0, 8]  # least recently used first
    assert cache.stats.evicted_blocks == 4


def test_cached_tokens_are_those_never_computed_when_a_row_is_preempted_before_its_first_chunk(loaded):
    """C takes over A's kept slot (9 tokens matched) and is preempted in the same step, before
    feeding anything, by B outgrowing its slot; its kept slot then goes to make room for B,
    and C comes back with no match and computes all 12 of its prompt tokens. It reports 0
    cached tokens, not the 9 of an admission that reused nothing."""
    A = [127, 15, 316, 231, 97, 362, 64, 381, 336, 179, 43]
    B = [353, 378, 223, 365, 27, 298, 13, 304, 138, 162, 218]
    C = A[:9] + [274, 376, 399]
    layers, heads, dim = loaded.model.kv_shape()
    token_bytes = 2 * layers * heads * dim * 4
    sched = make_scheduler(loaded, EngineConfig(block_size=4, memory_budget_bytes=32 * token_bytes))  # two 16-token slots
    starts = {}
    forward = sched.runner.forward

    def recording(feeds, previous):
        for feed in feeds:
            starts.setdefault(feed.key, []).append(feed.start)
        return forward(feeds, previous)

    sched.runner.forward = recording

    def greedy(n):
        return SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)

    a, b, c = Request(A, greedy(3)), Request(B, greedy(10)), Request(C, greedy(1))
    finals = {}

    def step():
        for e in sched.step():
            if e.finish_reason:
                finals[e.request_id] = e

    sched.add(a)
    while sched.has_work():
        step()
    sched.add(b)
    while sched.has_work():
        if c.id not in finals and all(r.id != c.id for r in list(sched.running) + list(sched.waiting)) \
                and sched.running and sched.running[0].cache.length >= 16:  # B's slot is full
            sched.add(c)
        step()
    assert sched.stats.preemptions >= 1
    assert starts[c.id][0] == 0  # C computed its whole prompt
    assert finals[c.id].cached_tokens == starts[c.id][0] == 0
    # The stats agree: each request's lookup counted once, with the match that counted.
    assert sched.prefix.stats.queried_tokens == len(A) + len(B) + len(C)
    assert sched.prefix.stats.hit_tokens == sum(f.cached_tokens for f in finals.values())


@pytest.mark.parametrize("arch", ["qwen3", "qwen3_5"])
def test_the_same_prompt_sent_together_is_computed_once(tiny_model_dir, arch):
    """n choices send one prompt n times at once: the first row computes it, the others wait
    for its whole blocks and copy them, computing only what is past them; outputs as alone.
    (A hybrid model's copy ends at the prompt's last whole block too: its recurrent state is
    snapshotted there.)"""
    loaded = load_model(str(tiny_model_dir(arch, "float32")), progress=False)
    tok = loaded.tokenizer
    prompt = tok.encode("Once upon a time there was a tiny model that generated text, and then it")
    params = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
    alone = run_alone(loaded, prompt, params, block_size=4, prefix_cache=False)
    sched = make_scheduler(loaded, EngineConfig(block_size=4, max_batch_tokens=8))
    fed = record_feeds(sched)
    requests = [Request(prompt, params) for _ in range(4)]
    for r in requests:
        sched.add(r)
    outputs = run_to_end(sched)
    assert [outputs[r.id] for r in requests] == [alone] * 4
    first, *twins = [fed[r.id] for r in requests]
    assert first == len(prompt) + len(alone) - 1
    whole = (len(prompt) - 1) // 4 * 4
    assert twins == [len(prompt) - whole + len(alone) - 1] * 3  # past the blocks they copied


def record_feeds(sched) -> dict:
    """request id -> how many tokens its feeds carried (prompt and generated)."""
    fed = {}
    forward = sched.runner.forward

    def recording(feeds, previous):
        for feed in feeds:
            fed[feed.key] = fed.get(feed.key, 0) + len(feed.tokens)
        return forward(feeds, previous)

    sched.runner.forward = recording
    return fed


def run_to_end(sched, max_steps=500) -> dict:
    outputs = {}
    for _ in range(max_steps):
        if not sched.has_work():
            break
        for e in sched.step():
            outputs.setdefault(e.request_id, []).extend(e.token_ids)
    assert not sched.has_work()
    return outputs
