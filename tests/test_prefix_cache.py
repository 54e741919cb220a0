"""The shared prefix cache: reuse, LRU eviction by bytes, refcounts, and output equivalence."""

import mlx.core as mx
import pytest

from mlxserve.cache import OutOfBlocks, PagedKVCache, RowCache
from mlxserve.engine import Engine, EngineConfig, make_scheduler
from mlxserve.loader import load_model
from mlxserve.prefix_cache import PrefixCache
from mlxserve.sampling import SamplingParams
from mlxserve.scheduler import Request

BS = 4


def pool(max_blocks=None, initial=4):
    return PagedKVCache(1, 1, 8, mx.float32, block_size=BS, initial_blocks=initial, max_blocks=max_blocks)


def row_with(kv, tokens):
    row = RowCache(kv)
    row.reserve(len(tokens))
    row.extend(len(tokens))
    return row


# ---- the structure on its own ---------------------------------------------------------------

def test_match_returns_longest_full_block_prefix_and_leaves_one_token():
    kv = pool()
    cache = PrefixCache(kv)
    tokens = list(range(10))  # 2 full blocks + 2 tokens
    row = row_with(kv, tokens)
    cache.insert(tokens, row.block_table, row.length)
    assert cache.cached_blocks == 2
    blocks, n, _ = cache.match(tokens + [99, 98])
    assert n == 8 and blocks == row.block_table[:2]
    # exactly two blocks long: one token must stay unfed, so only one block matches
    blocks, n, _ = cache.match(tokens[:8])
    assert n == 4
    assert cache.match([7] + tokens[1:])[1] == 0  # differs in the first block
    assert cache.stats.hit_tokens == 12


def test_refcounts_never_free_a_block_in_use():
    kv = pool(max_blocks=4)
    cache = PrefixCache(kv)
    tokens = list(range(8))
    first = row_with(kv, tokens)
    cache.insert(tokens, first.block_table, first.length)
    first.release()  # the cache still holds both blocks
    assert kv.allocator.num_free == 2
    user = RowCache(kv)
    blocks, n, _ = cache.match(tokens + [1])
    user.adopt_prefix(blocks, n)
    assert all(kv.allocator.refcount[b] == 2 for b in blocks)
    # Pool is full (4 blocks, budget 4): two free, two shared with `user`.
    other = RowCache(kv)
    other.reserve(8)  # takes the two free blocks
    with pytest.raises(OutOfBlocks):
        other.reserve(12)  # nothing evictable: the cached blocks are in use
    assert cache.cached_blocks == 2
    user.release()
    other.reserve(12)  # now the cache gives one back
    assert cache.cached_blocks == 1 and cache.stats.evicted_blocks >= 1


def test_lru_eviction_by_bytes_leaves_first():
    kv = pool(max_blocks=6, initial=6)
    cache = PrefixCache(kv)
    prefixes = {name: [base + i for i in range(8)] for name, base in (("a", 100), ("b", 200), ("c", 300))}
    for name in "abc":
        row = row_with(kv, prefixes[name])
        cache.insert(prefixes[name], row.block_table, row.length)
        row.release()
    assert cache.cached_bytes == 6 * kv.bytes_per_block
    cache.match(prefixes["a"] + [0])  # touch "a": now "b" is the least recently used
    newcomer = RowCache(kv)
    newcomer.reserve(8)  # needs two blocks: both of b's, leaf first
    assert cache.match(prefixes["b"] + [0])[1] == 0
    assert cache.match(prefixes["a"] + [0])[1] == 8
    assert cache.match(prefixes["c"] + [0])[1] == 8
    assert kv.bytes_in_use == 2 * kv.bytes_per_block  # only the newcomer's blocks count as in use


def test_a_parent_outlives_its_cached_children():
    kv = pool(max_blocks=3, initial=3)
    cache = PrefixCache(kv)
    tokens = list(range(12))
    row = row_with(kv, tokens)
    cache.insert(tokens, row.block_table, row.length)
    row.release()
    RowCache(kv).reserve(4)  # one block needed: the deepest block goes, not the root
    assert cache.match(tokens + [0])[1] == 8


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
    assert second_final.cached_tokens == (common // 8) * 8
    assert stats["prefix_hit_tokens"] >= second_final.cached_tokens


def test_chat_second_turn_reuses_the_first_turn(loaded):
    tok = loaded.tokenizer
    turn1 = tok.encode("<|im_start|>user\nTell me a story about a tiny model.<|im_end|>\n<|im_start|>assistant\n")
    with Engine(loaded, EngineConfig(block_size=8)) as engine:
        answer, _ = collect(engine.submit(Request(turn1, GREEDY)))
        turn2 = turn1 + answer + tok.encode("<|im_end|>\n<|im_start|>user\nAnd then?<|im_end|>\n<|im_start|>assistant\n")
        _, final = collect(engine.submit(Request(turn2, GREEDY)))
    # Everything computed in turn 1 (prompt + all but the last sampled token) is reusable.
    assert final.cached_tokens == ((len(turn1) + len(answer) - 1) // 8) * 8
    assert final.cached_tokens > len(turn1) // 2


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
    block_bytes = 2 * layers * 4 * heads * dim * 4
    sched = make_scheduler(loaded, EngineConfig(block_size=4, initial_blocks=4, memory_budget_bytes=12 * block_bytes))
    requests = [Request(p, params) for p in prompts]
    for r in requests:
        sched.add(r)
    outputs = {r.id: [] for r in requests}
    while sched.has_work():
        for e in sched.step():
            outputs[e.request_id].extend(e.token_ids)
    assert [outputs[r.id] for r in requests] == alone
    assert sched.stats.preemptions > 0


def test_cache_lives_in_the_pool_slack():
    """Cached blocks are evicted before the pool grows: the pool stays the size of the
    requests' working set (updates copy the whole pool on some back-ends)."""
    kv = pool(max_blocks=None, initial=4)
    cache = PrefixCache(kv)
    tokens = list(range(16))
    row = row_with(kv, tokens)
    cache.insert(tokens, row.block_table, row.length)
    row.release()
    RowCache(kv).reserve(16)  # needs all 4 blocks: the 4 cached ones go, no growth
    assert kv.allocator.num_blocks == 4 and cache.cached_blocks == 0


def test_default_budget_comes_from_device_memory(loaded):
    from mlxserve.memory import DEVICE_MEMORY_FRACTION, device_memory_bytes, weight_bytes

    sched = make_scheduler(loaded, EngineConfig())
    budget = sched.kv.max_blocks * sched.kv.bytes_per_block
    expected = device_memory_bytes() * DEVICE_MEMORY_FRACTION - weight_bytes(loaded.model)
    assert 0 < budget <= expected and budget > expected - sched.kv.bytes_per_block
