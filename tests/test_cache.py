"""The cache protocol: extend / trim / snapshot / restore, slots and their memory."""

import collections
import re

import numpy as np
import mlx.core as mx
import pytest

from mlxserve.cache import KVStore, OutOfKVMemory, RowCache, chunk_attention, decode_attention
from mlxserve.loader import load_model
from mlxserve.runner import Feed, Runner


@pytest.fixture(scope="module")
def setup(tiny_model_dir):
    loaded = load_model(str(tiny_model_dir("qwen3", "float32")), progress=False)
    return loaded.model


def make_runner(model, block_size=4, max_bytes=None):
    kv = KVStore(*model.kv_shape(), mx.float32, block_size=block_size, max_bytes=max_bytes)
    return Runner(model, kv)


def feed(runner, row, tokens, logits="last"):
    row.reserve(len(tokens))
    out, _ = runner.forward([Feed("r", tokens, row.length, row, logits)])
    mx.eval(out if out is not None else runner.kv.arrays())
    row.extend(len(tokens))
    return out


def alone_logits(model, tokens):
    runner = make_runner(model)
    return feed(runner, RowCache(runner.kv), tokens)


PROMPT = [5, 17, 42, 8, 99, 23, 4, 61, 7, 3, 11]


def test_trim_then_refeed_gives_identical_logits(setup):
    runner = make_runner(setup)
    plain = RowCache(runner.kv)
    feed(runner, plain, PROMPT + [12])
    expected = feed(runner, plain, [30])

    row = RowCache(runner.kv)
    feed(runner, row, PROMPT + [12])
    feed(runner, RowCache(runner.kv), [1])  # another row takes a slot in between
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
    feed(runner, row, [51, 52, 53, 54, 55])  # outgrows its 16-token slot: moves to a 32-token one
    assert row.capacity == 32
    row.restore(snap)
    assert row.length == len(PROMPT)
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


def test_rows_move_to_bigger_slots_and_release_frees_them(setup):
    runner = make_runner(setup, block_size=4)
    kv = runner.kv
    rows = [RowCache(kv) for _ in range(3)]
    for r in rows:
        feed(runner, r, PROMPT)  # 11 tokens (+ a quarter of headroom): 16-token slots
    assert [r.capacity for r in rows] == [16, 16, 16]
    assert sorted(r.slot for r in rows) == [0, 1, 2]
    assert kv.bytes_in_use == 3 * 16 * kv.bytes_per_token
    before = feed(runner, RowCache(kv), PROMPT + list(range(20, 30)))
    grown = rows[0]
    feed(runner, grown, list(range(20, 29)))  # 20 tokens: moves to the 32-token shelf, keys copied
    assert grown.capacity == 32
    assert mx.allclose(feed(runner, grown, [29]), before, atol=1e-5)
    for r in rows:
        r.release()
    assert kv.bytes_in_use == 32 * kv.bytes_per_token  # the row fed in one go still holds its slot


def test_budget_limits_growth_and_compacts_other_shelves(setup):
    runner = make_runner(setup, block_size=4)
    tb = runner.kv.bytes_per_token
    runner.kv.max_bytes = 3 * 16 * tb  # three 16-token slots, or one 32-token slot and one 16
    kv = runner.kv
    small = [RowCache(kv) for _ in range(3)]
    for r in small:
        feed(runner, r, PROMPT[:8])
    with pytest.raises(OutOfKVMemory):
        RowCache(kv).reserve(20)  # a 32-token slot: the three 16-token slots are in use
    small[1].release()
    small[2].release()
    # Two free 16-token slots are compacted away to make room for a 32-token one.
    big = RowCache(kv)
    big.reserve(20)
    assert big.capacity == 32 and kv.bytes_allocated <= kv.max_bytes
    assert small[0].slot == 0 and kv.shelves[16].num_slots == 1
    # the row that stayed still reads its own keys
    expected = alone_logits(setup, PROMPT[:9])
    assert mx.allclose(feed(runner, small[0], PROMPT[8:9]), expected, atol=1e-5)


@pytest.mark.parametrize("span_ratio,spanned", [(2, True), (1, False)])
def test_batched_rows_in_scattered_slots_match_alone(setup, monkeypatch, span_ratio, spanned):
    """Rows on one shelf in non-consecutive slots give the logits each gives alone, whether
    they attend over the run of slots from their first to their last (the gap's row computed
    and dropped) or gather their keys and values (see batch.DECODE_SPAN_MAX_RATIO)."""
    from mlxserve import batch as batch_module

    monkeypatch.setattr(batch_module, "DECODE_SPAN_MAX_RATIO", span_ratio)
    runner = make_runner(setup, block_size=4)
    kv = runner.kv
    prompts = [PROMPT, PROMPT[:5], PROMPT[3:], [9, 8, 7, 6, 5, 4]]
    alone = [alone_logits(setup, p) for p in prompts]
    rows = [RowCache(kv) for _ in range(5)]
    for r, p in zip(rows, prompts + [[1, 2]]):
        feed(runner, r, p)
    rows[1].release()  # a hole: slots 0, 2, 3 decode together
    for r, p in zip(rows, prompts):
        if r is rows[1]:
            continue
        r.trim(1)
    live = [(r, p) for r, p in zip(rows, prompts) if r is not rows[1]]
    feeds = [Feed(i, [p[-1]], r.length, r, "last") for i, (r, p) in enumerate(live)]
    for r, _ in live:
        r.reserve(1)
    logits, batch = runner.forward(feeds)
    (group,) = batch.groups
    assert [r.slot for r, _ in live] == [0, 2, 3]
    if spanned:
        assert (group.first_slot, group.slot_count) == (0, 4) and group.slots is None
        assert group.span_queries.tolist() == [0, 0, 1, 2] and group.span_outputs.tolist() == [0, 2, 3]
        assert group.mask.shape[0] == 4
    else:
        assert group.first_slot is None and group.slots.tolist() == [0, 2, 3]
    for i, (r, p) in enumerate(live):
        _, first, _ = next(x for x in batch.row_logits if x[0] == i)
        assert mx.allclose(logits[first], alone[prompts.index(p)][0], atol=1e-4)


@pytest.mark.parametrize(
    "live_slots,row_unit,run",
    [
        ([0, 1, 2], 4, (0, 4)),  # consecutive rows, one padding slot after them
        ([0, 2, 3], 4, (0, 4)),  # a gap, no padding
        ([5, 6, 7], 4, (4, 4)),  # at the shelf's end: the padding precedes the rows
        ([0, 1, 2], 16, None),  # 16 slots would pass the shelf's 8: not fused
    ],
)
def test_fused_decoding_rows_match_alone(setup, monkeypatch, live_slots, row_unit, run):
    """Decoding rows attending through MLX's fused attention (batch.FUSED_DECODE), their run
    of slots padded to a multiple of FUSED_DECODE_ROW_UNIT and their keys rounded up, give the
    logits each gives alone."""
    from mlxserve import batch as batch_module

    monkeypatch.setattr(batch_module, "FUSED_DECODE", True)
    monkeypatch.setattr(batch_module, "FUSED_DECODE_MIN_ROWS", 2)
    monkeypatch.setattr(batch_module, "FUSED_DECODE_ROW_UNIT", row_unit)
    runner = make_runner(setup, block_size=4)
    prompts = [PROMPT[i:] for i in range(8)]
    alone = [alone_logits(setup, p) for p in prompts]
    rows = [RowCache(runner.kv) for _ in prompts]
    for r, p in zip(rows, prompts):
        feed(runner, r, p)
    assert [r.slot for r in rows] == list(range(8)) and runner.kv.shelves[16].num_slots == 8
    live = [i for i, r in enumerate(rows) if r.slot in live_slots]
    for i, r in enumerate(rows):
        if i in live:
            r.trim(1)
        else:
            r.release()
    feeds = [Feed(i, [prompts[i][-1]], rows[i].length, rows[i], "last") for i in live]
    for i in live:
        rows[i].reserve(1)
    logits, batch = runner.forward(feeds)
    (group,) = batch.groups
    if run is None:
        assert not group.fused and group.mask.shape[-1] == max(len(prompts[i]) for i in live)
    else:
        assert group.fused and (group.first_slot, group.slot_count) == run
        assert group.mask.shape == (4, 1, 1, 16)  # the keys rounded up, to the shelf's capacity
    for i in live:
        _, first, _ = next(x for x in batch.row_logits if x[0] == i)
        assert mx.allclose(logits[first], alone[i][0], atol=1e-4)


def test_fused_decoding_by_default_only_where_it_was_measured_faster(monkeypatch):
    """batch.fuses_decoding: on a CUDA GPU, bf16/fp16, heads of at most 128, and at least 4
    query heads per KV head (Qwen3-4B's shape, faster fused; Qwen3-0.6B's 2, slower)."""
    from mlxserve import batch as batch_module
    from mlxserve.batch import fuses_decoding

    assert not fuses_decoding(mx.bfloat16, 128, 4)  # this machine computes on its CPU
    monkeypatch.setattr(batch_module, "on_cuda", lambda: True)
    assert fuses_decoding(mx.bfloat16, 128, 4) and fuses_decoding(mx.float16, 64, 8)
    assert not fuses_decoding(mx.bfloat16, 128, 2)  # Qwen3-0.6B
    assert not fuses_decoding(mx.float32, 128, 4)  # no cuDNN attention in float32
    assert not fuses_decoding(mx.bfloat16, 256, 4)  # Qwen3.5's heads: beyond cuDNN's 128
    monkeypatch.setattr(batch_module, "FUSED_DECODE", False)
    assert not fuses_decoding(mx.bfloat16, 128, 4)
    monkeypatch.setattr(batch_module, "on_cuda", lambda: False)
    monkeypatch.setattr(batch_module, "FUSED_DECODE", True)
    assert fuses_decoding(mx.float32, 256, 1)


def test_fused_key_lengths():
    from mlxserve.batch import fused_key_length

    lengths = {fused_key_length(n) for n in range(1, 4097)}
    assert sorted(lengths) == [256, 512, 768, 1024, 1536, 2048, 3072, 4096]
    assert all(0 <= fused_key_length(n) - n < max(256, n // 2) for n in range(1, 4097))


@pytest.mark.parametrize("q_heads,kv_heads", [(8, 2), (4, 4)])
def test_decode_attention_matches_masked_sdpa(q_heads, kv_heads):
    # Rows of different lengths: each row's mask hides its keys past its own length.
    n, length, d = 3, 9, 16
    rng = mx.random.key(3)
    kq, kk, kv = mx.random.split(rng, 3)
    q = mx.random.normal((n, q_heads, d), key=kq)
    k = mx.random.normal((n, kv_heads, length, d), key=kk)
    v = mx.random.normal((n, kv_heads, length, d), key=kv)
    lengths = mx.array([9, 4, 1])
    mask = mx.where(mx.arange(length)[None] < lengths[:, None], 0.0, -mx.inf)[:, None, None, :]
    ours = decode_attention(q, k, v, mask, 0.25)
    expected = mx.fast.scaled_dot_product_attention(q[:, :, None], k, v, scale=0.25, mask=mask)[:, :, 0]
    assert ours.shape == (n, q_heads, d)
    assert mx.abs(ours - expected).max().item() < 1e-5
    # The one-key row attends to its first value only.
    group = q_heads // kv_heads
    assert mx.allclose(ours[2], mx.repeat(v[2, :, 0], group, axis=0), atol=1e-6)


@pytest.mark.parametrize("q_heads,kv_heads", [(8, 2), (4, 4)])
def test_chunk_attention_matches_masked_sdpa(q_heads, kv_heads):
    # A chunk of t tokens starting at `start` over keys padded past its end: causal within the
    # chunk, every earlier key visible, the padding hidden.
    n, t, length, d, start = 2, 5, 16, 16, 7
    kq, kk, kv = mx.random.split(mx.random.key(4), 3)
    q = mx.random.normal((n, t, q_heads, d), key=kq)
    k = mx.random.normal((n, kv_heads, length, d), key=kk)
    v = mx.random.normal((n, kv_heads, length, d), key=kv)
    positions = mx.array([[start + i for i in range(t)], [i for i in range(t)]])
    visible = mx.arange(length)[None, None, None, :] <= positions[:, None, :, None]
    mask = mx.where(visible, 0.0, -mx.inf)
    ours = chunk_attention(q, k, v, mask, 0.25)
    expected = mx.fast.scaled_dot_product_attention(q.transpose(0, 2, 1, 3), k, v, scale=0.25, mask=mask)
    assert ours.shape == (n, t, q_heads, d)
    assert mx.abs(ours - expected.transpose(0, 2, 1, 3)).max().item() < 1e-5
    # The second row's first token sees only key 0.
    group = q_heads // kv_heads
    assert mx.allclose(ours[1, 0], mx.repeat(v[1, :, 0], group, axis=0), atol=1e-6)


def buffer_address(array: mx.array) -> int:
    view = np.asarray(memoryview(array))  # no copy; dropped at return, so it holds nothing
    return view.__array_interface__["data"][0]


def graph_operations(tmp_path, *outputs) -> collections.Counter:
    """The operations of the (unevaluated) graph that computes `outputs`, by primitive."""
    path = tmp_path / "graph.dot"
    mx.export_to_dot(str(path), *outputs)
    return collections.Counter(re.findall(r'label ="?([A-Za-z]+)', path.read_text()))


def test_a_short_chunk_over_many_keys_reads_fewer_padding_keys_and_matches_the_fused_path(setup, monkeypatch, tmp_path):
    """A short chunk deep into its row attends through chunk_attention over its keys rounded
    up to an eighth of the shelf size below, where MLX's fused attention reads a power-of-two
    key length; both give the logits of the whole prompt fed at once."""
    from mlxserve import batch as batch_module

    prompt = [(7 * i) % 97 + 1 for i in range(100)]
    expected = alone_logits(setup, prompt)

    def chunk_logits(max_tokens):
        monkeypatch.setattr(batch_module, "CHUNK_ATTENTION_MAX_TOKENS", max_tokens)
        monkeypatch.setattr(batch_module, "CHUNK_ATTENTION_MIN_KEYS", 16)
        runner = make_runner(setup, block_size=4)
        row = RowCache(runner.kv)
        feed(runner, row, prompt[:90], logits="none")
        row.reserve(10)
        out, batch = runner.forward([Feed("r", prompt[90:], 90, row, "last")])
        row.extend(10)
        operations = graph_operations(tmp_path, out)  # (before evaluation detaches the graph)
        return np.array(out), batch.groups[-1], operations

    chunked, group, chunked_ops = chunk_logits(128)
    assert group.chunked and group.key_length == 104  # 100 keys in units of 128 / 16
    fused, group, fused_ops = chunk_logits(0)
    assert not group.chunked and group.key_length == 128  # a shelf size: 4 blocks doubled
    # chunk_attention's output goes on as a view: no gather (a copy) per layer beyond the
    # step's own (the embedding, the logits rows), which the fused path has too.
    assert chunked_ops["Gather"] == fused_ops["Gather"]
    np.testing.assert_allclose(chunked, fused, atol=1e-5, rtol=0)
    np.testing.assert_allclose(chunked, np.array(expected), atol=1e-4, rtol=0)


def test_each_attention_mask_is_laid_out_once_per_step_and_added_by_the_scores_product(setup, monkeypatch, tmp_path):
    """Two decoding rows and a short chunk over many keys: each group's mask is put in the
    layout of its scores once (one copy per group, whatever the number of layers), and
    every layer's Q·K product adds it and applies the scale itself (an AddMM per group and
    layer, beside the output projection's and the MLP's), with no pass of its own."""
    from mlxserve import batch as batch_module

    monkeypatch.setattr(batch_module, "CHUNK_ATTENTION_MIN_KEYS", 16)
    runner = make_runner(setup, block_size=4)
    prompts = [[(5 * i) % 89 + 2 for i in range(n)] for n in (21, 27, 100)]
    rows = [RowCache(runner.kv) for _ in prompts]
    for row, tokens in zip(rows, prompts):
        feed(runner, row, tokens[:-1] if len(tokens) < 100 else tokens[:90], logits="none")
    feeds = [Feed(i, [tokens[-1]], len(tokens) - 1, row, "last") for i, (row, tokens) in enumerate(zip(rows[:2], prompts))]
    feeds.append(Feed(2, prompts[2][90:], 90, rows[2], "last"))
    for f in feeds:
        f.cache.reserve(len(f.tokens))
    out, batch = runner.forward(feeds)
    assert [g.chunked for g in batch.groups] == [False, True]
    operations = graph_operations(tmp_path, out)
    layers = len(setup.model.layers)
    assert layers > 1
    assert operations["Contiguous"] == 2
    assert operations["AddMM"] == 4 * layers
    assert batch.groups[0].expanded_mask.shape == (2, runner.kv.kv_heads, setup.args.num_attention_heads // runner.kv.kv_heads, 27)


def test_a_short_chunk_beside_decoding_rows_matches_the_fused_path_and_each_row_alone(setup, monkeypatch):
    """A step with two decoding rows and a short chunk deep into its row: the chunk attends
    through chunk_attention, and its output goes into the step's output as a strided view
    joined to the decoding rows' (KVStore.read). Logits equal those of the same step with
    every chunk through MLX's fused attention, and each row's alone."""
    from mlxserve import batch as batch_module

    long_prompt = [(7 * i) % 97 + 1 for i in range(100)]
    short = [[(5 * i) % 89 + 2 for i in range(n)] for n in (21, 27)]  # one shelf: one decode group

    def step_logits(max_tokens):
        monkeypatch.setattr(batch_module, "CHUNK_ATTENTION_MAX_TOKENS", max_tokens)
        monkeypatch.setattr(batch_module, "CHUNK_ATTENTION_MIN_KEYS", 16)
        runner = make_runner(setup, block_size=4)
        rows = [RowCache(runner.kv) for _ in range(3)]
        for row, tokens in zip(rows, short + [long_prompt]):
            feed(runner, row, tokens[:-1] if row is not rows[2] else tokens[:90], logits="none")
        feeds = [Feed(i, [tokens[-1]], len(tokens) - 1, row, "last") for i, (row, tokens) in enumerate(zip(rows, short))]
        feeds.append(Feed(2, long_prompt[90:], 90, rows[2], "last"))
        for f in feeds:
            f.cache.reserve(len(f.tokens))
        out, batch = runner.forward(feeds)
        return np.array(out), batch

    chunked, batch = step_logits(128)
    assert [g.chunked for g in batch.groups] == [False, True] and batch.groups[0].n_rows == 2
    fused, batch = step_logits(0)
    assert not any(g.chunked for g in batch.groups)
    np.testing.assert_allclose(chunked, fused, atol=1e-5, rtol=0)
    for i, tokens in enumerate(short + [long_prompt]):
        np.testing.assert_allclose(chunked[i], np.array(alone_logits(setup, tokens))[0], atol=1e-4, rtol=0)


def test_short_chunks_of_one_length_attend_as_one_group_and_match_each_row_alone(setup, monkeypatch):
    """Rows of one shelf feeding short chunks in one step (prompts' tails after a cached
    beginning, `n` choices): chunks of one length form one group, even in slots with a gap
    between them (a freed slot) and over few keys, and attend through one chunk_attention;
    another length is a group of its own, and a group whose scores would pass
    CHUNK_GROUP_MAX_SCORES is cut in two. Logits equal those of the same step with each chunk
    through MLX's fused attention, and each row's alone."""
    from mlxserve import batch as batch_module

    prompts = [[(5 * i + 3 * r) % 89 + 2 for i in range(n)] for r, n in enumerate((21, 30, 26, 17))]
    fed = [16, 25, 21, 14]  # the first three feed 5 tokens, the last 3

    def step_logits(max_tokens, max_scores=batch_module.CHUNK_GROUP_MAX_SCORES):
        monkeypatch.setattr(batch_module, "CHUNK_ATTENTION_MAX_TOKENS", max_tokens)
        monkeypatch.setattr(batch_module, "CHUNK_GROUP_MAX_SCORES", max_scores)
        runner = make_runner(setup, block_size=4)
        rows = [RowCache(runner.kv) for _ in range(5)]
        for row in rows:
            row.reserve(21)  # slots 0-4 of one shelf
        for row, tokens, n in zip([rows[0]] + rows[2:], prompts, fed):
            feed(runner, row, tokens[:n], logits="none")
        rows[1].release()  # a free slot between the first row and the others
        rows = [rows[0]] + rows[2:]
        feeds = [Feed(i, tokens[n:], n, row, "last") for i, (row, tokens, n) in enumerate(zip(rows, prompts, fed))]
        for f in feeds:
            f.cache.reserve(len(f.tokens))
        out, batch = runner.forward(feeds)
        return np.array(out), batch

    chunked, batch = step_logits(128)
    assert len({row.shelf for row in batch.groups[0].caches + batch.groups[1].caches}) == 1
    assert sorted((g.n_rows, g.tokens_per_row, g.chunked) for g in batch.groups) == [(1, 3, False), (3, 5, True)]
    assert next(g for g in batch.groups if g.n_rows == 3).slots is not None  # gathered: not consecutive
    # Scores capped at two rows of 5 tokens over 30 keys: the three rows (21, 30 and 26 keys)
    # go in two groups.
    capped, capped_batch = step_logits(128, max_scores=2 * 5 * 30)
    assert [(g.n_rows, g.tokens_per_row) for g in capped_batch.groups] == [(1, 3), (2, 5), (1, 5)]
    fused, batch = step_logits(0)
    assert len(batch.groups) == 4 and not any(g.chunked for g in batch.groups)
    np.testing.assert_allclose(chunked, fused, atol=1e-5, rtol=0)  # (the same flat order)
    np.testing.assert_allclose(capped, fused, atol=1e-5, rtol=0)
    for key, first, _ in batch.row_logits:
        np.testing.assert_allclose(chunked[first], np.array(alone_logits(setup, prompts[key]))[0], atol=1e-4, rtol=0)


def test_copying_a_slots_positions_writes_them_in_place():
    """A prefix-cache copy (KVStore.copy) writes the positions into the shelf's arrays in
    place: memory grows by about the positions copied, not by a copy of each layer's whole
    array (which MLX makes when the written values are a view of the array itself), and
    the destination holds the source's positions, the rest unchanged."""
    kv_heads, d, layers = 2, 64, 2
    store = KVStore(layers, kv_heads, d, mx.float32, block_size=64)
    rows = [RowCache(store) for _ in range(8)]
    for row in rows:
        row.reserve(700)  # one shelf of 1,024-token slots
    shelf = rows[0].shelf
    assert all(row.shelf is shelf for row in rows)
    for layer in range(layers):
        shelf.kv[layer] = mx.random.normal(shelf.kv[layer].shape)
    mx.eval(shelf.kv)
    before = [np.array(a) for a in shelf.kv]
    array_bytes = shelf.kv[0].nbytes
    mx.reset_peak_memory()
    start = mx.get_active_memory()
    for row in rows[1:]:
        store.copy(shelf, rows[0].slot, shelf, row.slot, 600)
    mx.eval(shelf.kv)
    assert mx.get_peak_memory() - start < array_bytes  # (one copy's positions: 1.2 MB; one layer's array: 8 MB)
    for layer in range(layers):
        after, expected = np.array(shelf.kv[layer]), before[layer].copy()
        for row in rows[1:]:
            expected[:, row.slot, :, :600] = before[layer][:, rows[0].slot, :, :600]
        np.testing.assert_array_equal(after, expected)


def test_kv_write_lands_at_each_rows_slot_and_position_only():
    """A step's K and V go to [0 or 1, slot, head, position] of the layer's shelf array, for
    rows in scattered slots and prefill chunks alike, and nothing else in the array changes
    (written eagerly and, for a write covering the whole step, as the compiled pieces do)."""
    from mlxserve.batch import build_batch
    from mlxserve.cache import scatter_kv

    kv_heads, d = 2, 4
    store = KVStore(1, kv_heads, d, mx.float32, block_size=4)
    rows = [RowCache(store) for _ in range(4)]
    lengths = [3, 0, 5, 1]
    for row, length in zip(rows, lengths):
        row.reserve(length + 4)
        row.extend(length)
    rows[1].release()  # slot 1 free: the others are not consecutive
    live = [rows[0], rows[2], rows[3]]
    news = [1, 4, 1]  # two decoding rows and a 4-token chunk
    feeds = [Feed(i, [7] * n, row.length, row, "last") for i, (row, n) in enumerate(zip(live, news))]
    batch = build_batch(feeds, block_size=4)
    T = batch.tokens.size
    keys = mx.arange(T * kv_heads * d, dtype=mx.float32).reshape(T, kv_heads, d) + 1
    values = -keys
    shelf = live[0].shelf
    assert all(row.shelf is shelf for row in live)
    before = mx.random.normal(shelf.kv[0].shape)  # distinct values everywhere
    shelf.kv[0] = mx.array(before)
    store.write(0, mx.concatenate([keys, values], axis=1), batch)
    after = shelf.kv[0]
    assert after.shape == (2, shelf.num_slots, kv_heads, shelf.capacity, d)
    expected = mx.array(before)  # a copy: item assignment rebinds this array object
    for i, row in enumerate(live):
        start = batch.row_offsets[i]
        for j in range(news[i]):
            position = row.length + j
            expected[0, row.slot, :, position] = keys[start + j]
            expected[1, row.slot, :, position] = values[start + j]
    assert mx.array_equal(after, expected)
    assert len(batch.writes) == 1 and batch.writes[0].count == T
    assert mx.array_equal(scatter_kv(before, mx.concatenate([keys, values], axis=1), batch.writes[0].rows), expected)


def test_growing_a_shelf_holds_the_new_shelf_and_a_few_old_layers_at_most():
    """Where the budget has no room for the old shelf beside the new one, a shelf grows (and
    compacts) layer by layer, waiting for the copies after every quarter of the layers (here
    2 of 8), so its peak memory is the new shelf plus a few old layers."""
    layers = 8
    # 16-token slots of 2,048 bytes a token: 32 KB a slot. 570 KB holds the 16 slots the
    # shelf grows to (512 KB) but not the 8 old ones beside them (768 KB), nor the 2 slots
    # left by the compaction beside the 16 (576 KB).
    kv = KVStore(layers, 2, 16, mx.float32, block_size=4, max_bytes=570 * 1024)
    rows = [RowCache(kv) for _ in range(8)]
    for r in rows:
        r.reserve(10)  # 16-token slots: the shelf doubles up to 8 slots
    shelf = rows[0].shelf
    assert shelf.num_slots == 8
    old_total, layer_bytes = shelf.bytes, shelf.kv[0].nbytes
    mx.synchronize()
    # Start from an empty buffer cache: buffers earlier tests left there change which
    # allocations are fresh, and the peak with them (4 KB over the bound after test_bench.py).
    mx.clear_cache()
    baseline = mx.get_active_memory()
    mx.reset_peak_memory()
    RowCache(kv).reserve(10)  # a ninth row: the shelf doubles to 16 slots
    assert shelf.num_slots == 16
    grown_by = shelf.bytes - old_total
    # old + new side by side would be old_total more: 8 layers of 8 slots.
    assert mx.get_peak_memory() - baseline <= grown_by + 3 * layer_bytes
    for r in rows[:7]:
        r.release()
    mx.reset_peak_memory()
    baseline = mx.get_active_memory()
    assert shelf.compact() > 0
    index_bytes = 4 * shelf.num_slots  # the held slots' order, an int32 array
    assert mx.get_peak_memory() - baseline <= 2 * shelf.kv[0].nbytes + index_bytes


def test_a_shelf_with_room_in_the_budget_grows_without_waiting_and_keeps_its_rows(monkeypatch):
    """Where the budget holds the old shelf beside the new one, the copies that grow it are
    queued without waiting for the device (a wait is a pause for every decoding stream);
    the rows already there keep their K/V, and the new slots are zeros."""
    kv = KVStore(8, 2, 16, mx.float32, block_size=4, max_bytes=768 * 1024)
    rows = [RowCache(kv) for _ in range(8)]
    for r in rows:
        r.reserve(10)
    shelf = rows[0].shelf
    for layer in range(8):  # each slot's positions hold distinct values
        shelf.kv[layer] = mx.random.normal(shelf.kv[layer].shape)
    before = [mx.array(a) for a in shelf.kv]
    mx.eval(before)
    waits = []
    monkeypatch.setattr(mx, "synchronize", lambda *a: waits.append("synchronize"))
    RowCache(kv).reserve(10)  # a ninth row: 8 slots become 16
    monkeypatch.undo()
    assert shelf.num_slots == 16 and waits == []
    for layer in range(8):
        assert mx.array_equal(shelf.kv[layer][:, :8], before[layer])
        assert mx.all(shelf.kv[layer][:, 8:] == 0).item()


def test_a_large_growth_for_a_waiting_row_is_allocated_over_steps_then_used_in_place(monkeypatch):
    """A row that can wait (a request being admitted) and needs a shelf to grow by more than
    GROWTH_BYTES_PER_STEP gets GrowthPending while the new arrays are allocated a few layers
    per call, counted in the budget meanwhile; then the shelf takes those very arrays, with
    the old slots' K/V copied in, and no wait for the device. A running row's growth (no
    may_wait) happens at once."""
    from mlxserve import cache as cache_module
    from mlxserve.cache import GrowthPending

    layers = 8
    # 16-token slots, 2,048 bytes a token: 32 KB a slot; a layer's array of two slots is 8 KB.
    monkeypatch.setattr(cache_module, "GROWTH_BYTES_PER_STEP", 3 * 8192)  # 3 layers a step
    kv = KVStore(layers, 2, 16, mx.float32, block_size=4, max_bytes=1 << 20)
    first = RowCache(kv)
    first.reserve(10)  # not may_wait: one slot at once
    shelf = first.shelf
    for layer in range(layers):
        shelf.kv[layer] = mx.random.normal(shelf.kv[layer].shape)
    before = [mx.array(a) for a in shelf.kv]
    mx.eval(before)
    waits = []
    monkeypatch.setattr(mx, "synchronize", lambda *a: waits.append("synchronize"))
    second = RowCache(kv)
    prepared = []
    for _ in range(2):  # layers 0-2, then 3-5
        with pytest.raises(GrowthPending):
            second.reserve(10, may_wait=True)
        assert second.shelf is None and shelf.num_slots == 1
        # Counted whole from its start: the old slot, and the new arrays' two beside it.
        assert kv.bytes_allocated == 3 * shelf.slot_bytes
        prepared = list(shelf.prepared)
    mx.eval(prepared)
    addresses = [buffer_address(a) for a in prepared]
    second.reserve(10, may_wait=True)  # layers 6-7, and the growth
    assert waits == []
    assert second.shelf is shelf and shelf.num_slots == 2 and shelf.prepared == []
    mx.eval(shelf.kv)
    # The old K/V went into the buffers allocated at the earlier calls: nothing new now.
    assert [buffer_address(a) for a in shelf.kv[:6]] == addresses
    for layer in range(layers):
        assert mx.array_equal(shelf.kv[layer][:, :1], before[layer])
        assert mx.all(shelf.kv[layer][:, 1:] == 0).item()
    third = RowCache(kv)
    third.reserve(10)  # a running row's way: 2 slots become 4 at once
    assert shelf.num_slots == 4 and third.shelf is shelf


def test_a_growth_not_carried_on_at_the_next_admission_is_given_up(monkeypatch):
    """A growth in progress belongs to the request at the head of the queue: an admission
    that does not carry it on (that request was cancelled, or found a slot elsewhere) gives
    it up, and its bytes with it. A running row short of memory gives it up too."""
    from mlxserve import cache as cache_module
    from mlxserve.cache import GrowthPending

    monkeypatch.setattr(cache_module, "GROWTH_BYTES_PER_STEP", 1)  # one layer a step
    # 1,024 bytes a token: a 16-token slot is 16 KB, and the budget six of them.
    kv = KVStore(4, 2, 16, mx.float32, block_size=4, max_bytes=6 * 16 * 1024)
    first = RowCache(kv)
    first.reserve(10)
    shelf, one_slot = first.shelf, first.shelf.slot_bytes
    assert one_slot == 16 * 1024
    with pytest.raises(GrowthPending):
        RowCache(kv).reserve(10, may_wait=True)
    kv.end_admission()
    assert shelf.growing_to == 2 and kv.bytes_allocated == 3 * one_slot
    kv.end_admission()  # nobody asked again
    assert shelf.growing_to == 0 and shelf.prepared == [] and kv.bytes_allocated == one_slot
    # Again, then a running row needs more than the budget leaves beside the growth: its
    # compaction gives the growth up rather than failing.
    with pytest.raises(GrowthPending):
        RowCache(kv).reserve(10, may_wait=True)
    assert kv.bytes_allocated == 3 * one_slot
    runner = RowCache(kv)
    runner.reserve(40)  # a 64-token slot, 4 small slots' bytes: it fits only without the growth
    assert shelf.growing_to == 0 and kv.bytes_allocated == one_slot + 4 * one_slot


def test_a_new_shelf_is_queued_without_waiting_for_the_device(monkeypatch):
    """A prompt that needs a shelf of a new size (a long prompt arriving while rows decode)
    gets its zero-filled arrays queued: the host does not wait for the step in flight."""
    kv = KVStore(4, 2, 16, mx.float32, block_size=4)
    waits = []
    monkeypatch.setattr(mx, "eval", lambda *a: waits.append("eval"))
    monkeypatch.setattr(mx, "synchronize", lambda *a: waits.append("synchronize"))
    row = RowCache(kv)
    row.reserve(100)
    assert waits == []
    monkeypatch.undo()
    shelf = row.shelf
    assert shelf.capacity >= 100 and len(shelf.kv) == 4
    assert all(mx.all(layer == 0).item() for layer in shelf.kv)
