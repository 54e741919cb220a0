"""What one forward pass of the model sees: the step's tokens, flattened across rows.

A step feeds several rows at once. Row r contributes `t_r` new tokens (1 for a decode row,
k+1 for a row verifying k draft tokens, a chunk for a prefilling row). All new tokens are
concatenated into one flat sequence so that every weight matrix is read once per step.
Attention is the only part that needs to know about rows: the decoding rows of a shelf (see
cache.py) form one `AttentionGroup` that runs as one batched attention call, so do its short
multi-token feeds of one length, every longer one is a group of its own, and each shelf
receives the step's new K/V in one `ShelfWrite`.
"""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx
import numpy as np

# Multi-token feeds of at most this many tokens per row over at least this many keys attend
# through cache.chunk_attention, others through MLX's fused attention. H200, bf16, 16 query and 8
# KV heads (`scripts/bench_ops.py`): 96 tokens over 8192 keys 104 us against 200 us for MLX's
# masked attention; 512 tokens over 4096 keys 181 us against 108 (MLX's cost follows the keys,
# this one's the scores).
CHUNK_ATTENTION_MAX_TOKENS = 128
CHUNK_ATTENTION_MIN_KEYS = 2048
# Short feeds of one length attend as one group (see build_batch) whose materialised scores,
# tokens x keys per query head, stay within what one such chunk makes over 16k keys.
CHUNK_GROUP_MAX_SCORES = CHUNK_ATTENTION_MAX_TOKENS * 16384

# Decoding rows of a shelf in slots with gaps between them attend over the whole run of slots
# from their first to their last (a view of the shelf, the gaps' rows computed and dropped)
# while that run is at most this many times their number; sparser rows gather their keys and
# values instead. Rows fall into such gaps whenever requests end at different times (a
# server's usual state; the prefix cache keeps finished rows' slots). Gathering was the cost:
# on an H100, Qwen3-4B bf16, 32 rows decoding after a first wave of 32 requests took 25.4 ms a
# step gathered, 13.9 ms over their run (the first wave, consecutive: 11.6 and 12.9 ms), and
# the bench's 64 streams (`scripts/bench_variant.py bench --random-weights qwen3-4b
# --concurrency 64`) made 1,582 tok/s gathering always, 2,113 with runs up to twice the rows
# and 2,204 up to four times (docs/performance-history.md, 2026-12-06).
DECODE_SPAN_MAX_RATIO = 4

# Decoding rows of a run of slots (consecutive, or spanned as above) attend through MLX's
# fused attention where `fuses_decoding` says so: each KV head's query heads are the query
# rows of one head of plain multi-head attention, over the rows' keys with their additive
# mask, which MLX runs through cuDNN on a CUDA GPU. cuDNN builds a plan the first time it
# sees a shape (38-818 ms each on an H100), so the rows are padded to a multiple of
# FUSED_DECODE_ROW_UNIT slots (the padding slots computed and dropped like a span's gaps) and
# the keys rounded up (`fused_key_length`), to keep the set of shapes a server meets small:
# at most 4 row counts for 64 rows times 8 key lengths. Fewer rows or longer keys stay with
# cache.decode_attention (cuDNN took 9.39 against its 6.55 ms for 8 rows over 16k keys).
# Measured on an H100 (docs/performance-history.md, session 28), the bench at 32 and 64
# streams: Qwen3-4B (4 query heads per KV head) made 2,134-2,548 and 2,675-2,815 total tok/s
# fused against 2,082-2,204 and 2,159-2,321 without; Qwen3-0.6B (2 per KV head) 2,624-3,069
# and 2,716-3,943 fused against 2,748-3,577 and 4,082-4,373 without, its steps bound by the
# host, which a cuDNN call costs more than the four kernels it replaces. Hence the rule of
# FUSED_DECODE_MIN_GROUP. FUSED_DECODE: None decides so, True or False forces it.
FUSED_DECODE: bool | None = None
FUSED_DECODE_MIN_GROUP = 4
FUSED_DECODE_MIN_ROWS = 16
FUSED_DECODE_ROW_UNIT = 16
FUSED_DECODE_MAX_KEYS = 4096


def on_cuda() -> bool:
    """Whether MLX computes on a CUDA GPU."""
    cuda = getattr(mx, "cuda", None)  # (MLX builds before the CUDA back-end have no mx.cuda)
    return mx.default_device() == mx.gpu and cuda is not None and cuda.is_available()


def fuses_decoding(dtype: mx.Dtype, head_dim: int, group: int) -> bool:
    """Whether decoding rows attend through MLX's fused attention (see FUSED_DECODE): on a
    CUDA GPU, in bf16 or fp16, heads of at most 128 (where MLX runs it through cuDNN), with
    at least FUSED_DECODE_MIN_GROUP query heads per KV head."""
    if FUSED_DECODE is not None:
        return FUSED_DECODE
    return (group >= FUSED_DECODE_MIN_GROUP and dtype in (mx.bfloat16, mx.float16) and head_dim % 8 == 0
            and head_dim <= 128 and on_cuda())


def fused_key_length(key_length: int) -> int:
    """Keys of a fused decoding group: rounded up to a multiple of 256 up to 1024, of 512 up
    to 2048, of 1024 up to 4096: 8 lengths to 4096, fewer than 256 or half as many keys more
    than needed, whichever is more."""
    unit = 256
    while unit * 4 < key_length:
        unit *= 2
    return -(-key_length // unit) * unit


def scores_mask(mask: mx.array, kv_heads: int, group: int) -> mx.array:
    """An additive attention mask [n, 1, t, L] in the layout of the scores that
    cache.decode_attention (t == 1: [n, kv_heads, group, L]) and
    cache.chunk_attention_by_kv_head ([n, 1, t * group, L], the same for every KV head)
    compute, so that their Q·K product adds it and applies the scale in its epilogue
    (mx.addmm): one kernel per layer fewer than a product followed by a scale-and-mask pass.
    Made once per step and group (AttentionGroup.scores_mask), read by every layer.
    Materialised, not broadcast, but over the chunk's KV heads: the product's batch must be
    one strided run (MLX gives cuBLASLt a batch of pointers otherwise), and a broadcast over
    its query rows has no layout the product can read."""
    n, _, t, length = mask.shape
    if t == 1:
        return mx.contiguous(mx.broadcast_to(mask, (n, kv_heads, group, length)))
    expanded = mx.broadcast_to(mask[:, :, :, None, :], (n, 1, t, group, length))
    return mx.contiguous(expanded).reshape(n, 1, t * group, length)


@dataclass
class AttentionGroup:
    """Rows of one shelf attending together: its decoding rows, or one multi-token feed.

    Flat tokens [offset, offset + n_rows * tokens_per_row) belong to this group, row-major.
    """

    offset: int
    n_rows: int
    tokens_per_row: int
    shelf: object
    first_slot: int | None  # the rows lie in slots first_slot ... first_slot + slot_count - 1
    slots: mx.array | None  # otherwise their slots, gathered
    key_length: int  # keys to attend over: the longest row's length after this step
    mask: mx.array | None  # additive [slot_count or n, 1, t + extra_queries, key_length]; None for one decoding row
    caches: list  # the rows' RowCaches in group order (linear-attention layers read their state)
    # Decoding rows with gaps between their slots, attending over the slots' whole run
    # (DECODE_SPAN_MAX_RATIO): slot_count is the run's length; span_queries gives each slot of
    # the run the row whose query it takes (a gap takes row 0's, and its mask shows it key 0
    # only), span_outputs each row's slot in the run. Otherwise slot_count is n_rows, and both None.
    slot_count: int = 0
    span_queries: mx.array | None = None
    span_outputs: mx.array | None = None
    state_gather: object = None  # hybrid models: a cache.StateGather, made by the first linear layer
    # The step's padding tokens, when they follow this group (a single multi-token feed, the
    # last group) and attend as extra queries of its row; see build_batch.
    extra_queries: int = 0
    # Short multi-token feeds (several rows, or one over many keys): they attend through
    # cache.chunk_attention (see CHUNK_ATTENTION_MAX_TOKENS), over fewer padding keys than
    # MLX's fused attention.
    chunked: bool = False
    # Decoding rows attending through MLX's fused attention (FUSED_DECODE): their run of
    # slots (first_slot, slot_count) padded, the keys rounded up; mask [slot_count, 1, 1, key_length].
    fused: bool = False
    expanded_mask: mx.array | None = None  # see scores_mask

    def scores_mask(self, kv_heads: int, group: int) -> mx.array:
        """`mask` as cache.decode_attention and cache.chunk_attention_by_kv_head add it to
        their scores (`scores_mask`), made at the step's first attention layer and
        shared by the others."""
        if self.expanded_mask is None:
            self.expanded_mask = scores_mask(self.mask, kv_heads, group)
        return self.expanded_mask


@dataclass
class ShelfWrite:
    """Flat tokens [offset, offset + count) go to one shelf: token i's K of kv head h is row
    `rows[i, h]`, its V row `rows[i, kv_heads + h]`, of a layer's array seen as
    [2 * slots * kv_heads * capacity, head_dim] (see cache.Shelf). An index array made once
    per step for every layer makes each write a single scatter (per-axis indices cost
    index-building and cast kernels per layer) that reads the new K and V side by side,
    [count, 2 * kv_heads, head_dim], as they are, views included."""

    shelf: object
    offset: int
    count: int
    rows: mx.array | None  # [count, 2 * kv_heads]: K rows, then V rows


@dataclass
class StepBatch:
    """Inputs of one forward pass."""

    tokens: mx.array  # [T] int32, flat
    positions: mx.array  # [T] int32
    writes: list[ShelfWrite]
    groups: list[AttentionGroup]
    logit_rows: mx.array  # indices into the flat tokens whose logits are wanted
    row_logits: list  # per row in flat order: (row key, first logits row, number of logits rows)
    row_offsets: dict  # row key -> index of its first token in the flat sequence
    max_tokens_per_row: int  # 1 when every row decodes
    padding: int  # tokens at the end of `tokens` that belong to no row: they only make up a bucket size
    compile: bool  # the model may run its per-layer pieces compiled (see models/compiled.py)
    # Layers whose outputs the model hands back (llama.run_layers), and those outputs, concatenated
    # per flat token: a DFlash draft's context (spec/dflash.py).
    capture: tuple[int, ...] = ()
    captured: mx.array | None = None
    # The final norm's output at the positions that get logits (logit_rows' order), set by the
    # forward pass: an embedding request reads its prompt's last position here.
    hidden: mx.array | None = None


def split_by_scores(members: list, t: int) -> list[list]:
    """Short feeds of `t` tokens (in slot order) in runs that attend as one group each, a
    run's scores (tokens x keys per query head) at most CHUNK_GROUP_MAX_SCORES: chunk_attention
    materialises them."""
    runs: list[list] = [[]]
    keys = 0
    for row in members:
        keys_with = max(keys, row.start + t)
        if runs[-1] and (len(runs[-1]) + 1) * t * keys_with > CHUNK_GROUP_MAX_SCORES:
            runs.append([])
            keys_with = row.start + t
        runs[-1].append(row)
        keys = keys_with
    return runs


def padding_for(num_tokens: int, pad_to: int) -> int:
    """Padding tokens that make a padded step of `num_tokens` tokens a bucket size: a
    multiple of `pad_to`. (A function of its own so that A/B runs can try other sizes.)"""
    return -num_tokens % pad_to


def build_batch(rows: list, mask_dtype: mx.Dtype = mx.float32, block_size: int = 64,
                pad_to: int | None = None, small_step_tokens_per_row: int = 4,
                fuse_decoding: bool = False) -> StepBatch:
    """Build a StepBatch from per-row feeds.

    A small step (no row feeds more than `small_step_tokens_per_row` tokens) may run compiled
    as it is. A bigger one (a prefill chunk in it) may run compiled only if `pad_to` is given:
    its flat tokens are then padded to a multiple of it, so that a few shapes cover every
    step. Without it such a step runs eagerly. `fuse_decoding`: decoding rows may attend
    through MLX's fused attention (see FUSED_DECODE).

    `rows` holds objects with: key, tokens (list[int] new tokens), start (position of the
    first new token), cache (a RowCache whose slot covers start + len(tokens) positions)
    and logits (which of the new tokens need logits: "last", "all", "none", or an int n: the
    last n).
    The flat order is shelf by shelf, then by token count, then by slot, so that each group
    and each shelf's writes are one contiguous slice of the flat sequence.
    """
    by_group: dict[tuple, list] = {}
    for row in rows:
        # Decoding rows of a shelf attend together, and so do its short multi-token feeds of
        # one length (the tails of prompts that share a cached beginning, `n` choices of one
        # prompt, rows verifying drafts of one length): one batched cache.chunk_attention
        # instead of an attention call each, which the host pays for in every layer. A
        # longer chunk is a group of its own (one row keeps the fused attention's shapes few).
        t = len(row.tokens)
        alone = t > CHUNK_ATTENTION_MAX_TOKENS
        by_group.setdefault((row.cache.shelf.capacity, t, row.cache.slot if alone else -1), []).append(row)

    tokens: list[int] = []
    positions: list[int] = []
    write_slots: list[int] = []
    logit_rows: list[int] = []
    row_logits: list = []
    row_offsets: dict = {}
    groups: list[AttentionGroup] = []
    query_positions: list[np.ndarray] = []  # per group, [n, t]
    ordered: list[tuple[int, list]] = []
    for (_, t, _), members in sorted(by_group.items(), key=lambda item: item[0]):
        members.sort(key=lambda row: row.cache.slot)
        if 1 < t <= CHUNK_ATTENTION_MAX_TOKENS:  # short feeds of one length
            ordered += [(t, run) for run in split_by_scores(members, t)]
        else:
            ordered.append((t, members))
    for t, members in ordered:
        offset = len(tokens)
        pos = np.empty((len(members), t), dtype=np.int32)
        for i, row in enumerate(members):
            base = len(tokens)
            row_offsets[row.key] = base
            tokens.extend(row.tokens)
            pos[i] = np.arange(row.start, row.start + t, dtype=np.int32)
            write_slots.extend([row.cache.slot] * t)
            first = len(logit_rows)
            if row.logits == "all":
                logit_rows.extend(range(base, base + t))
            elif row.logits == "last":
                logit_rows.append(base + t - 1)
            elif isinstance(row.logits, int):  # the last n positions (a draft's verification)
                logit_rows.extend(range(base + t - row.logits, base + t))
            row_logits.append((row.key, first, len(logit_rows) - first))
        positions.extend(pos.reshape(-1).tolist())
        slots = [row.cache.slot for row in members]
        key_length = int(pos[:, -1].max()) + 1
        slot_count = slots[-1] - slots[0] + 1  # (sorted above)
        consecutive = slot_count == len(slots)
        spanned = not consecutive and t == 1 and slot_count <= DECODE_SPAN_MAX_RATIO * len(slots)
        first_slot = slots[0]
        fused = False
        if t == 1 and (consecutive or spanned) and len(members) >= FUSED_DECODE_MIN_ROWS and fuse_decoding:
            padded = -(-slot_count // FUSED_DECODE_ROW_UNIT) * FUSED_DECODE_ROW_UNIT
            num_slots = members[0].cache.shelf.num_slots
            keys = min(fused_key_length(key_length), members[0].cache.capacity)
            if padded <= num_slots and keys <= FUSED_DECODE_MAX_KEYS:
                # The padding slots follow the rows' run, or precede it at the shelf's end.
                fused = True
                first_slot = min(first_slot, num_slots - padded)
                slot_count, key_length = padded, keys
                spanned = slot_count != len(slots)
        chunked = False
        if t > 1:
            # Prefill chunks attend over a key length rounded up to a shelf size (4 blocks
            # doubled), masked: fused attention kernels are built per shape (cuDNN: tens of
            # ms each), and exact lengths would make every chunk of a long prompt a new shape.
            # A 16k-token prompt then uses 7 key lengths, at most twice the keys it needs.
            rounded = 4 * block_size
            while rounded < key_length:
                rounded *= 2
            rounded = min(rounded, members[0].cache.capacity)
            # Several short feeds always go through chunk_attention, which takes them at once;
            # one over few keys goes through MLX's fused attention (see CHUNK_ATTENTION_MIN_KEYS).
            chunked = t <= CHUNK_ATTENTION_MAX_TOKENS and (len(members) > 1 or rounded >= CHUNK_ATTENTION_MIN_KEYS)
            if chunked:
                # chunk_attention is plain matrix products and a softmax, which build nothing
                # per shape, so it need not read up to twice the keys (its cost follows the
                # scores it materialises, chunk tokens x keys): an eighth of the shelf size
                # below is the unit, at most 12.5 % more keys than needed. Not whole blocks
                # only: MLX reuses a freed buffer for a later array only if the sizes are
                # within 32 KB, so a score array that grew at every chunk of a long prompt
                # would be allocated afresh at every step; in units, the next few chunks
                # reuse this one's buffers.
                unit = max(block_size, rounded // 16)
                key_length = min(-(-key_length // unit) * unit, rounded)
            else:
                key_length = rounded
        groups.append(
            AttentionGroup(
                offset=offset,
                n_rows=len(members),
                tokens_per_row=t,
                shelf=members[0].cache.shelf,
                first_slot=first_slot if consecutive or spanned else None,
                slots=None if consecutive or spanned else mx.array(slots),
                key_length=key_length,
                mask=None,  # made below, once the padding is known
                caches=[row.cache for row in members],
                chunked=chunked,
                slot_count=slot_count if spanned else len(slots),
                fused=fused,
            )
        )
        if spanned:
            in_run = np.asarray(slots) - first_slot
            queries = np.zeros(slot_count, dtype=np.int32)  # the gaps take row 0's query
            queries[in_run] = np.arange(len(slots))
            groups[-1].span_queries = mx.array(queries)
            if in_run[-1] != len(slots) - 1:  # else the rows are the run's first slots: a slice
                groups[-1].span_outputs = mx.array(in_run.astype(np.int32))
            run_pos = np.zeros((slot_count, 1), dtype=np.int32)  # a gap sees key 0 only
            run_pos[in_run] = pos
            pos = run_pos
        query_positions.append(pos)

    # One write per shelf: groups of a shelf are adjacent in the flat order.
    writes: list[ShelfWrite] = []
    columns = np.asarray(positions, dtype=np.int32)
    slot_arr = np.asarray(write_slots, dtype=np.int32)
    for g in groups:
        end = g.offset + g.n_rows * g.tokens_per_row
        if writes and writes[-1].shelf is g.shelf:
            writes[-1].count = end - writes[-1].offset
        else:
            writes.append(ShelfWrite(g.shelf, g.offset, end - g.offset, None))
    for w in writes:
        kv_heads, capacity = w.shelf.store.kv_heads, w.shelf.capacity
        slots = slot_arr[w.offset : w.offset + w.count, None].astype(np.int64)
        cols = columns[w.offset : w.offset + w.count, None]
        rows = (slots * kv_heads + np.arange(kv_heads)) * capacity + cols
        values_from = w.shelf.num_slots * kv_heads * capacity  # V's half of the array
        w.rows = mx.array(np.concatenate([rows, rows + values_from], axis=1).astype(np.int32))

    num_tokens = len(tokens)
    max_per_row = max(g.tokens_per_row for g in groups)
    small = max_per_row <= small_step_tokens_per_row
    padding = 0 if small or pad_to is None else padding_for(num_tokens, pad_to)
    # Padding tokens: token 0 at position 0. No write covers them, so they touch no cache,
    # and no logits row points at them. When the last group is a single multi-token feed
    # (the usual padded step: a prompt's chunk, perhaps beside decoding rows), they attend as
    # extra queries of its row, seeing its first key only: attention then gives every flat
    # token its row of output at once, where the padding's rows were otherwise made and
    # concatenated to the groups' outputs in every layer (a copy of all of them).
    last = groups[-1]
    if padding and last.n_rows == 1 and last.tokens_per_row > 1:
        last.extra_queries = padding
        query_positions[-1] = np.concatenate([query_positions[-1], np.zeros((1, padding), np.int32)], axis=1)
    for g, pos in zip(groups, query_positions):
        if g.n_rows == 1 and g.tokens_per_row == 1:
            continue  # one decoding row attends over exactly its keys: no mask
        # Key j is visible to the query at position p iff j <= p: this is both the causal
        # rule and the cut-off of shorter rows. Built once here, shared by every layer.
        visible = mx.arange(g.key_length)[None, None, None, :] <= mx.array(pos)[:, None, :, None]
        g.mask = mx.where(visible, mx.array(0.0, mask_dtype), mx.array(-float("inf"), mask_dtype))
    flat_tokens = np.zeros(num_tokens + padding, dtype=np.int32)
    flat_tokens[:num_tokens] = tokens
    flat_positions = np.zeros(num_tokens + padding, dtype=np.int32)
    flat_positions[:num_tokens] = columns
    return StepBatch(
        tokens=mx.array(flat_tokens),
        positions=mx.array(flat_positions),
        writes=writes,
        groups=groups,
        logit_rows=mx.array(np.asarray(logit_rows, dtype=np.int32)),
        row_logits=row_logits,
        row_offsets=row_offsets,
        max_tokens_per_row=max_per_row,
        padding=padding,
        compile=small or pad_to is not None,
    )
