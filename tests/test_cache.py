"""The cache protocol: extend / trim / snapshot / restore, and block accounting."""

import mlx.core as mx
import pytest

from mlxserve.cache import BlockAllocator, OutOfBlocks, PagedKVCache, RowCache
from mlxserve.loader import load_model
from mlxserve.runner import Feed, Runner


@pytest.fixture(scope="module")
def setup(tiny_model_dir):
    loaded = load_model(str(tiny_model_dir("qwen3", "float32")), progress=False)
    return loaded.model


def make_runner(model, block_size=4, initial_blocks=2, max_blocks=None):
    kv = PagedKVCache(*model.kv_shape(), mx.float32, block_size=block_size,
                      initial_blocks=initial_blocks, max_blocks=max_blocks)
    return Runner(model, kv)


def feed(runner, row, tokens, logits="last"):
    row.reserve(len(tokens))
    out, _ = runner.forward([Feed("r", tokens, row.length, row.block_table, logits)])
    mx.eval(out if out is not None else runner.kv.keys + runner.kv.values)
    row.extend(len(tokens))
    return out


PROMPT = [5, 17, 42, 8, 99, 23, 4, 61, 7, 3, 11]


def test_trim_then_refeed_gives_identical_logits(setup):
    runner = make_runner(setup)
    plain = RowCache(runner.kv)
    feed(runner, plain, PROMPT + [12])
    expected = feed(runner, plain, [30])

    row = RowCache(runner.kv)
    feed(runner, row, PROMPT + [12])
    feed(runner, RowCache(runner.kv), [1])  # another row interleaves its blocks
    # Speculation-style: verify 3 draft tokens, reject them all, continue.
    feed(runner, row, [77, 78, 79], logits="all")
    row.trim(3)
    assert row.length == len(PROMPT) + 1
    assert mx.array_equal(feed(runner, row, [30]), expected)


def test_snapshot_restore_round_trip(setup):
    runner = make_runner(setup)
    row = RowCache(runner.kv)
    feed(runner, row, PROMPT)
    snap = row.snapshot()
    first = feed(runner, row, [50])
    feed(runner, row, [51, 52, 53, 54, 55])  # crosses block boundaries
    row.restore(snap)
    assert row.length == len(PROMPT)
    assert len(row.block_table) == -(-len(PROMPT) // runner.kv.block_size)
    assert mx.array_equal(feed(runner, row, [50]), first)
    with pytest.raises(ValueError):
        row.restore(type(snap)(length=row.length + 5))


def test_prefill_only_step_returns_no_logits_and_writes_kv(setup):
    runner = make_runner(setup)
    chunked = RowCache(runner.kv)
    assert feed(runner, chunked, PROMPT[:6], logits="none") is None
    after_chunks = feed(runner, chunked, PROMPT[6:])
    whole = feed(runner, RowCache(runner.kv), PROMPT)
    assert mx.allclose(after_chunks, whole, atol=1e-5)


def test_logits_all_positions_match_incremental(setup):
    """A row verifying k tokens gets, per position, the logits incremental decoding gives."""
    runner = make_runner(setup)
    a = RowCache(runner.kv)
    feed(runner, a, PROMPT)
    multi = feed(runner, a, [9, 10, 11], logits="all")
    b = RowCache(runner.kv)
    feed(runner, b, PROMPT)
    singles = [feed(runner, b, [t])[0] for t in (9, 10, 11)]
    assert mx.allclose(multi, mx.stack(singles), atol=1e-5)


def test_release_frees_every_block_and_pool_grows(setup):
    runner = make_runner(setup, block_size=4, initial_blocks=2)
    kv = runner.kv
    rows = [RowCache(kv) for _ in range(3)]
    for r in rows:
        feed(runner, r, PROMPT)
    assert kv.allocator.num_blocks >= 9  # grew from 2
    assert kv.bytes_in_use == 9 * kv.bytes_per_block
    for r in rows:
        r.release()
    assert kv.allocator.num_free == kv.allocator.num_blocks
    assert kv.bytes_in_use == 0


def test_budget_limits_growth(setup):
    runner = make_runner(setup, block_size=4, initial_blocks=2, max_blocks=4)
    row = RowCache(runner.kv)
    feed(runner, row, PROMPT[:8])
    with pytest.raises(OutOfBlocks):
        row.reserve(9)


def test_allocator_refcounts():
    alloc = BlockAllocator(4)
    a = alloc.allocate()
    alloc.retain(a)
    alloc.release(a)
    assert alloc.num_free == 3  # still held once
    alloc.release(a)
    assert alloc.num_free == 4
    with pytest.raises(AssertionError):
        alloc.release(a)
    b = alloc.allocate()
    c = alloc.allocate(prefer=b + 1)
    assert c == b + 1
