"""Per-request model state: attention K/V in slot-dense shelves, and the four cache verbs.

Every row owns a *slot*: one dense run of positions [0, capacity) in every attention layer's
K and V. Slots of the same capacity live together on a `Shelf`, whose per-layer arrays have
shape [2 (K, V), slots, kv_heads, capacity, head_dim]; capacities are powers of two times a base (4
blocks), so a row wastes at most half its slot, and a row that outgrows its slot moves to
the next shelf (one copy of its keys).

Why slots and not a paged pool: MLX has no paged-attention kernel, so attention needs each
row's keys as one dense [kv_heads, length, head_dim] run. A paged pool must gather every
row's blocks in every layer at every step, and on back-ends that do not update arrays in
place (MLX's CUDA back-end copies a buffer it writes into) every KV write copies the whole
pool. On an H200 the attention of 32 decoding rows was several times slower from a paged pool
than from slots (a micro-benchmark of the two layouts, 28 layers, ~600 keys per row).

The cache protocol every model kind supports, per row (see `RowCache`):
  extend(n)      count n more tokens written by the last forward pass
  trim(n)        forget the last n tokens (attention only; used to roll back rejected drafts)
  snapshot()     remember the state at the current length
  restore(snap)  go back to a snapshot (attention: trim to its length; recurrent layers:
                 put the saved state back)
`reserve(n)` makes room for n more tokens first (a slot, or a bigger one). Attention K/V
below a row's length is never rewritten, so a snapshot of attention state is just a length;
recurrent state (hybrid models) is saved by reference, MLX arrays being immutable values.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import mlx.core as mx
from rich.filesize import decimal as human_size

from .batch import ShelfWrite, StepBatch, scores_mask

# The prefix cache may keep this many slots on a shelf, or a quarter as many as rows run there
# if more, before a new row reuses the least recently used one instead of growing the shelf.
# Why a bound at all: a back-end that does not update arrays in place (MLX's CUDA back-end)
# copies a whole shelf at every step, so kept slots cost time there, not only memory.
KEPT_SLOTS_BEFORE_REUSE = 4

# A shelf that grows for a new request (KVStore.acquire with may_wait) while the budget holds
# it beside its old self gets its new arrays allocated at most this many bytes per step, the
# request waiting meanwhile. Allocating fresh device memory cost the host 1.6-3.5 ms per
# GB with MLX's CUDA back-end (28 new arrays of 268 MB took 11.9 ms on an H100's host,
# 2026-12-05), and the host's time is a pause for every stream decoding at that step: the
# long-prompt bench's worst step was such a growth (13.1 ms of a 32.5 ms step, against
# 17.5 ms for its median step; scripts/profile_long_prompt.py, H100).
GROWTH_BYTES_PER_STEP = 1 << 30


class OutOfKVMemory(RuntimeError):
    """No slot is free and the memory budget does not allow another."""


class GrowthPending(Exception):
    """The slot's shelf is being grown over several steps (see GROWTH_BYTES_PER_STEP): ask
    again at the next step. Only the request at the head of the queue grows a shelf so (the
    scheduler admits in order), and a growth it does not carry on at the next step's
    admission is given up (KVStore.end_admission)."""


class Shelf:
    """Slots of one capacity: per layer one array [2, slots, kv_heads, capacity, head_dim],
    K then V. One array, not two, because MLX's CUDA back-end picks its attention kernel for
    a single decoding row by the K/V buffers: slices of a buffer of their own (an mlx-lm
    style cache) go to cuDNN, two kernels and a costly call on the host; others to MLX's
    one-kernel vector attention (up to 1,024 keys; two beyond). On an H200 this took a
    Qwen3-0.6B single-stream step from 425 kernels to 397 and its encoding from 4.5-5.1 ms
    to 3.9 (scripts/kernel_census.py, scripts/profile_step.py). Copies and compactions are
    also one operation per layer.

    `holders[slot]` is whoever owns the slot (a running row's RowCache, or a finished row's
    slot kept by the prefix cache); free slots are handed out lowest first, so running rows
    tend to sit next to each other and attention can read them as one slice.
    """

    def __init__(self, store: KVStore, capacity: int):
        self.store = store
        self.capacity = capacity
        self.num_slots = 0
        self.kv: list[mx.array] = []
        self.free: list[int] = []  # a heap
        self.holders: dict[int, object] = {}
        # A growth in progress (see prepare): the first layers' new arrays, of `growing_to` slots.
        self.prepared: list[mx.array] = []
        self.growing_to = 0

    @property
    def slot_bytes(self) -> int:
        return self.capacity * self.store.bytes_per_token + self.store.state_bytes_per_slot

    @property
    def preparing_bytes(self) -> int:
        """What a growth in progress holds at its end: the new arrays whole, beside the old."""
        return self.growing_to * self.slot_bytes

    @property
    def bytes(self) -> int:
        return self.num_slots * self.slot_bytes + self.preparing_bytes

    def _shape(self, slots: int) -> tuple[int, ...]:
        s = self.store
        return (2, slots, s.kv_heads, self.capacity, s.head_dim)

    def prepare(self, n: int) -> bool:
        """One step of a growth by n slots: allocate the next layers' new arrays (zero-filled),
        GROWTH_BYTES_PER_STEP of them at most. True once every layer has one: `grow(n)` then
        copies the old arrays into them and allocates nothing. From the first call the growth
        counts in `bytes` as it will be at its end (`preparing_bytes`)."""
        s = self.store
        if self.growing_to != self.num_slots + n:
            self.drop_prepared()
            self.growing_to = self.num_slots + n
        s.advanced.add(self)
        shape = self._shape(self.growing_to)
        layer_bytes = math.prod(shape) * s.dtype.size
        count = min(max(1, GROWTH_BYTES_PER_STEP // layer_bytes), s.num_layers - len(self.prepared))
        new = [mx.zeros(shape, dtype=s.dtype) for _ in range(count)]
        mx.async_eval(new)
        self.prepared += new
        return len(self.prepared) == s.num_layers

    def drop_prepared(self) -> int:
        """Give up a growth in progress; returns the bytes it had reserved."""
        released = self.preparing_bytes
        self.prepared, self.growing_to = [], 0
        return released

    def grow(self, n: int) -> None:
        """Add n slots. Zero-filled: masked-out keys must still be finite numbers."""
        s = self.store
        shape = self._shape(n)
        complete = self.growing_to == self.num_slots + n and len(self.prepared) == s.num_layers
        prepared = self.prepared if complete else None
        self.drop_prepared()
        if prepared is not None and self.num_slots:
            # The old arrays go into the first slots of the prepared ones, in place (MLX
            # writes into an array no one else holds): no allocation now.
            for layer, old in enumerate(self.kv):
                new, prepared[layer] = prepared[layer], None
                new[:, : self.num_slots] = old
                self.kv[layer] = new
            mx.async_eval(self.kv)
        elif prepared is not None:
            self.kv = prepared
        elif self.num_slots:
            # Broadcast zeros: the copy reads one element for the whole pad.
            pad = mx.broadcast_to(mx.zeros((1,) * len(shape), dtype=s.dtype), shape)
            self._replace_layers(lambda a: mx.concatenate([a, pad], axis=1), self.bytes + n * self.slot_bytes)
        else:
            # A zeros array per layer, not one shared: each layer's writes replace its own.
            # Queued, not waited for: a prompt admitted while rows decode would otherwise
            # hold the host until the device had finished the step in flight, and the
            # decoding rows' next step with it.
            self.kv = [mx.zeros(shape, dtype=s.dtype) for _ in range(s.num_layers)]
            mx.async_eval(self.kv)
        for slot in range(self.num_slots, self.num_slots + n):
            heapq.heappush(self.free, slot)
        self.num_slots += n

    def _replace_layers(self, new_array: Callable[[mx.array], mx.array], new_bytes: int) -> None:
        """Replace each layer's array by `new_array` of it (a shelf of `new_bytes`).

        The copies are queued without waiting when the budget has room for the whole old
        shelf beside the new one. A wait also waits for the step in flight, a pause for every
        stream decoding at the time (a shelf grows when, say, a new long prompt arrives while
        the prefix cache keeps the last one's slot). Queueing all of a Qwen3-0.6B 16k-token
        shelf's copies took the host 1.3 ms, waiting after each layer 5 ms (H200,
        scripts/bench_shelf_growth.py, the device otherwise idle).

        Without that room, layer by layer: an old array goes as soon as its successor
        exists, and the host waits after every quarter of the layers, so the peak is the new
        shelf plus a few old layers, not the old shelf and the new one side by side (1.5
        times the new shelf when it doubles)."""
        wait = not self.fits_beside_itself(new_bytes)
        stride = max(1, len(self.kv) // 4)
        for layer, old in enumerate(self.kv):
            self.kv[layer] = new_array(old)
            del old
            mx.async_eval(self.kv[layer])
            if wait and (layer + 1) % stride == 0:
                mx.synchronize()

    def fits_beside_itself(self, new_bytes: int) -> bool:
        """Whether the budget holds a new form of this shelf, of `new_bytes`, while the old one
        still exists (a growth of it in progress is the new form)."""
        store = self.store
        held = store.bytes_allocated - self.preparing_bytes
        return store.max_bytes is None or held + new_bytes <= store.max_bytes

    def take(self, holder: object) -> int:
        slot = heapq.heappop(self.free)
        self.holders[slot] = holder
        return slot

    def give_back(self, slot: int) -> None:
        del self.holders[slot]
        heapq.heappush(self.free, slot)

    def compact(self, keep_growth: bool = False) -> int:
        """Drop free slots, moving held ones down (holders learn their new slot), and a growth
        in progress unless `keep_growth` and no slot is free. Returns the bytes released. One
        gather per layer: a pause, so only under memory pressure."""
        released = 0 if keep_growth and not self.free else self.drop_prepared()
        if not self.free:
            return released
        before = self.bytes
        kept = sorted(self.holders)
        if kept:
            order = mx.array(kept)
            self._replace_layers(lambda a: mx.take(a, order, axis=1), len(kept) * self.slot_bytes)
        else:
            self.kv = []
        holders = {new: self.holders[old] for new, old in enumerate(kept)}
        for new, holder in holders.items():
            holder.slot = new
        self.holders = holders
        self.free = []
        self.num_slots = len(kept)
        return released + before - self.bytes


class KVStore:
    """The K/V of all attention layers of one model, on shelves, within a byte budget."""

    def __init__(
        self,
        num_layers: int,
        kv_heads: int,
        head_dim: int,
        dtype: mx.Dtype,
        block_size: int = 64,
        max_bytes: int | None = None,
        max_row_tokens: int | None = None,
        state_bytes_per_row: int = 0,
    ):
        self.num_layers = num_layers
        self.kv_heads = kv_heads
        self.head_dim = head_dim
        self.dtype = dtype
        self.block_size = block_size  # the prefix cache's unit; shelves are multiples of it
        self.max_bytes = max_bytes
        # What error messages say of the budget, when make_scheduler has more to say (a draft
        # model's context shares it).
        self.budget_note: str | None = None
        self.max_row_tokens = max_row_tokens
        self.shelves: dict[int, Shelf] = {}
        # Hybrid models: every slot also pays for its row's recurrent state, as live state
        # plus the two snapshots a row keeps for the prefix cache (see RowCache.recurrent).
        self.state_bytes_per_row = state_bytes_per_row
        self.state_bytes_per_slot = 3 * state_bytes_per_row
        # Set by the prefix cache: give up one kept slot (on `shelf` if given, else anywhere,
        # least recently used first); False when there is none to give.
        self.reclaim: Callable[[Shelf | None], bool] | None = None
        # Shelves whose growth in progress was carried on since the last end_admission.
        self.advanced: set[Shelf] = set()

    # ---- memory -------------------------------------------------------------------------
    @property
    def budget_text(self) -> str:
        return self.budget_note or f"the KV memory budget is {human_size(self.max_bytes)}"

    @property
    def bytes_per_token(self) -> int:
        return 2 * self.num_layers * self.kv_heads * self.head_dim * self.dtype.size

    @property
    def bytes_allocated(self) -> int:
        return sum(s.bytes for s in self.shelves.values())

    @property
    def bytes_in_use(self) -> int:
        """Bytes of slots that running rows hold (slots the prefix cache keeps are
        reclaimable and not counted)."""
        return sum(s.slot_bytes for s in self.shelves.values() for h in s.holders.values() if isinstance(h, RowCache))

    def arrays(self) -> list[mx.array]:
        return [a for s in self.shelves.values() for a in s.kv]

    def capacity_for(self, tokens: int) -> int:
        """The shelf capacity for a row of `tokens` tokens: 4 blocks doubled until it fits,
        but not past the longest row the model allows (rounded up to a block) when that
        suffices."""
        capacity = 4 * self.block_size
        while capacity < tokens:
            capacity *= 2
        if self.max_row_tokens is not None:
            longest = -(-self.max_row_tokens // self.block_size) * self.block_size
            capacity = max(min(capacity, longest), tokens)
        return capacity

    def slot_bytes_for(self, tokens: int) -> int:
        """What the slot of a row of `tokens` tokens costs."""
        return self.capacity_for(tokens) * self.bytes_per_token + self.state_bytes_per_slot

    def fits_alone(self, tokens: int) -> bool:
        """Whether a row of `tokens` tokens fits the budget with no other slot held."""
        return self.max_bytes is None or self.slot_bytes_for(tokens) <= self.max_bytes

    def acquire(self, holder: object, tokens: int, may_wait: bool = False) -> tuple[Shelf, int]:
        """A slot holding at least `tokens` tokens, for `holder`.

        Order of preference: a free slot of the right shelf; a new slot within budget
        (shelves double) unless the prefix cache already keeps its share of that shelf (see
        KEPT_SLOTS_BEFORE_REUSE), in which case its least recently used slot there is reused
        first; then room made elsewhere (kept slots anywhere, free slots of other shelves
        compacted away).

        `may_wait`: the holder can wait (a request being admitted, not a running row), so a
        large growth is spread over steps (`_grows_in_steps`): GrowthPending until it is done.
        """
        capacity = self.capacity_for(tokens)
        shelf = self.shelves.get(capacity)
        if shelf is None:
            shelf = self.shelves[capacity] = Shelf(self, capacity)
        while True:
            if shelf.free:
                shelf.drop_prepared()
                return shelf, shelf.take(holder)
            kept = sum(1 for h in shelf.holders.values() if not isinstance(h, RowCache))
            if kept >= max(KEPT_SLOTS_BEFORE_REUSE, (len(shelf.holders) - kept) // 4):
                if self.reclaim is not None and self.reclaim(shelf):
                    continue
            # (A growth of this shelf in progress is this growth: its bytes are not in the way.)
            room = None if self.max_bytes is None else (self.max_bytes - self.bytes_allocated + shelf.preparing_bytes) // shelf.slot_bytes
            if room is None or room >= 1:
                want = max(1, shelf.num_slots)
                n = want if room is None else min(want, room)
                if may_wait and self._grows_in_steps(shelf, n) and not shelf.prepare(n):
                    raise GrowthPending(f"a shelf of {capacity}-token slots is growing")
                shelf.grow(n)
                continue
            # Free slots elsewhere become bytes by compaction; a kept slot elsewhere must be
            # evicted first (one at a time: each is compacted away before the next goes). A
            # growth in progress elsewhere is the waiting request's own (its slot with less
            # headroom, see RowCache.reserve): given up for a running row, not for it.
            if self._compact_others(shelf, keep_growths=may_wait):
                continue
            if self.reclaim is not None and self.reclaim(None):
                continue
            raise OutOfKVMemory("KV memory budget reached")

    @staticmethod
    def _grows_in_steps(shelf: Shelf, n: int) -> bool:
        """Whether growing `shelf` by n slots allocates more than GROWTH_BYTES_PER_STEP, with
        room in the budget for the old shelf beside the new one, which a growth spread over
        steps holds at its end."""
        new_bytes = (shelf.num_slots + n) * shelf.slot_bytes
        return new_bytes > GROWTH_BYTES_PER_STEP and shelf.fits_beside_itself(new_bytes)

    def _compact_others(self, keep: Shelf, keep_growths: bool) -> bool:
        released = 0
        for capacity, shelf in list(self.shelves.items()):
            if shelf is not keep:
                released += shelf.compact(keep_growths)
                if not shelf.num_slots and not shelf.growing_to:
                    del self.shelves[capacity]
        return released > 0

    def end_admission(self) -> None:
        """Give up the growths in progress that this admission did not carry on: the request
        that started one was cancelled, or admitted elsewhere (a prefix match changed its
        slot), or is no longer first in line."""
        for shelf in self.shelves.values():
            if shelf not in self.advanced:
                shelf.drop_prepared()
        self.advanced = set()

    def drop_growths(self) -> None:
        """Give up every growth in progress (the request at the head of the queue is gone)."""
        for shelf in self.shelves.values():
            shelf.drop_prepared()

    def copy(self, src: Shelf, src_slot: int, dst: Shelf, dst_slot: int, n: int) -> None:
        """Copy the first n positions of a slot into another, in every layer.

        The positions are read out into arrays of their own first, and evaluated: MLX
        updates an array in place only when nothing else holds its buffer, and a slice of a
        shelf array is a view of that buffer. Written straight from such a view, each copy
        first copied the whole array of every layer (every slot of the shelf), and requests
        admitted together each made such copies (README, "Measured": the shared-prefix
        bench). The wait costs little: a step waits for the one before it anyway."""
        positions = [mx.contiguous(src.kv[layer][:, src_slot, :, :n]) for layer in range(self.num_layers)]
        mx.eval(positions)
        for layer, values in enumerate(positions):
            dst.kv[layer][:, dst_slot, :, :n] = values

    # ---- attention ----------------------------------------------------------------------
    def attend(self, layer: int, projected: tuple, batch: StepBatch, scale: float, written: bool) -> tuple:
        """An attention layer's mix: `projected` is (q, kv, *rest) as its `before` made it
        (kv: K heads then V heads, see `write`), or (q, *rest) when a compiled piece already
        wrote kv (see whole_write). Writes it if not, attends; returns (output, *rest)."""
        if written:
            q, *rest = projected
        else:
            q, kv, *rest = projected
            self.write(layer, kv, batch)
        return (self.read(layer, q, batch, scale), *rest)

    def write(self, layer: int, kv: mx.array, batch: StepBatch) -> None:
        """The step's new keys and values (RoPE applied) into the rows' slots: kv is
        [T, 2 * kv_heads, D], each token's K heads, then its V heads."""
        for w in batch.writes:
            w.shelf.kv[layer] = scatter_kv(w.shelf.kv[layer], kv[w.offset : w.offset + w.count], w.rows)

    def whole_write(self, batch: StepBatch) -> ShelfWrite | None:
        """The step's only write when it covers every flat token, else None. Such a write
        has the same form at every step of the same rows, so a model may do it inside a
        compiled piece (`scatter_kv`, then `put`) instead of calling `write`."""
        if len(batch.writes) == 1 and batch.writes[0].count == batch.tokens.size:
            return batch.writes[0]
        return None

    def put(self, layer: int, write: ShelfWrite, kv: mx.array) -> None:
        """A layer's shelf array, as `scatter_kv` returned it for `write`."""
        write.shelf.kv[layer] = kv

    def read(self, layer: int, queries: mx.array, batch: StepBatch, scale: float) -> mx.array:
        """Attention of the step's queries [T, q_heads, D] over their rows' keys, per group
        (the step's K/V already written). Returns [T, q_heads * D] in flat order; the
        padding tokens' rows are those of extra queries (AttentionGroup.extra_queries) or
        repeat the last real row (see `padding_rows`).

        The groups' outputs are put together as [rows, kv_heads, group, D], a form in which
        a short chunk's output is a strided view of what chunk_attention computes (see
        `chunk_attention_by_kv_head`): the concatenation of several groups then copies it
        into place once, where making it contiguous first took a copy of its own."""
        q_heads, d = queries.shape[1], queries.shape[2]
        kv_heads = self.kv_heads
        group = q_heads // kv_heads
        outputs = []
        for g in batch.groups:
            n, t, length = g.n_rows, g.tokens_per_row, g.key_length
            shelf = g.shelf.kv[layer]
            if g.first_slot is not None:
                # The rows lie in a run of slots: a view, no copy.
                end = g.first_slot + g.slot_count
                k = shelf[0, g.first_slot : end, :, :length]
                v = shelf[1, g.first_slot : end, :, :length]
            else:
                k = mx.take(shelf[0, :, :, :length], g.slots, axis=0)
                v = mx.take(shelf[1, :, :, :length], g.slots, axis=0)
            if t == 1 and g.mask is not None:
                q = queries[g.offset : g.offset + n].reshape(n, q_heads, d)
                if g.span_queries is not None:  # a run with gaps or padding: one query per slot of it
                    q = mx.take(q, g.span_queries, axis=0)
                if g.fused:  # see batch.FUSED_DECODE
                    q = q.reshape(g.slot_count, kv_heads, group, d)
                    o = mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask=g.mask)
                else:
                    o = decode_attention(q, k, v, g.scores_mask(kv_heads, group), scale)
                if g.span_outputs is not None:
                    o = mx.take(o, g.span_outputs, axis=0)
                elif o.shape[0] != n:  # padding after the rows
                    o = o[:n]
                outputs.append(o.reshape(n, kv_heads, group, d))
                continue
            t += g.extra_queries  # the step's padding, attending as this row's extra queries
            if g.chunked:
                q = queries[g.offset : g.offset + n * t].reshape(n, t, q_heads, d)
                o = chunk_attention_by_kv_head(q, k, v, g.scores_mask(kv_heads, group), scale)  # [n, kv_heads, t, group, D]
                if n == 1:
                    # squeeze, not o[0]: MLX indexes an array by a lone integer with a
                    # gather, a copy of the whole output in every layer.
                    outputs.append(o.squeeze(0).transpose(1, 0, 2, 3))  # a view
                else:
                    outputs.append(o.transpose(0, 2, 1, 3, 4).reshape(n * t, kv_heads, group, d))
                continue
            q = queries[g.offset : g.offset + n * t].reshape(n, t, q_heads, d).transpose(0, 2, 1, 3)
            o = mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask=g.mask)
            outputs.append(o.transpose(0, 2, 1, 3).reshape(n * t, kv_heads, group, d))
        if batch.padding and not batch.groups[-1].extra_queries:
            outputs.append(padding_rows(outputs[-1], batch.padding))
        out = outputs[0] if len(outputs) == 1 else mx.concatenate(outputs)
        return out.reshape(-1, q_heads * d)


def padding_rows(last: mx.array, padding: int) -> mx.array:
    """Rows for a step's padding tokens (see batch.build_batch) after the real rows `last`
    ends with: nothing reads them but the padding tokens' own later rows, so any finite
    values do. A broadcast of the last real row, which the concatenation copies like any
    other input, where a zeros array would cost a fill kernel of its own in every layer."""
    return mx.broadcast_to(last[-1:], (padding, *last.shape[1:]))


def scatter_kv(shelf: mx.array, kv: mx.array, rows: mx.array) -> mx.array:
    """A layer's shelf array with new keys and values, kv [count, 2 * kv_heads, D] (K heads,
    then V heads), written at `rows` (ShelfWrite.rows): one scatter into the array seen as
    [positions, D]. K and V side by side make it one kernel where two scatters ran (the
    models' projections produce them so, see llama.RotaryNorm). Pure, so that it can run
    inside a compiled piece."""
    flat = shelf.reshape(-1, kv.shape[-1])
    flat[rows] = kv
    return flat.reshape(shelf.shape)


def decode_attention(q: mx.array, k: mx.array, v: mx.array, mask: mx.array, scale: float) -> mx.array:
    """Attention of decoding rows of different lengths: q [n, q_heads, D] (one token per row),
    k/v [n, kv_heads, L, D], mask [n, 1, 1, L] additive, or already laid out as the scores
    (batch.scores_mask). Returns [n, q_heads, D].

    MLX's fused kernels take no per-row lengths, and with an array mask its attention falls
    back to separate operations that broadcast K and V over the query heads of each KV head.
    Here each KV head's query heads are one matrix of queries instead, so the work is two
    plain batched matrix products around a softmax, the first adding the mask and applying
    the scale itself (mx.addmm).
    """
    n, q_heads, d = q.shape
    kv_heads = k.shape[1]
    group = q_heads // kv_heads
    q = q.reshape(n, kv_heads, group, d)
    if mask.shape[1:3] != (kv_heads, group):
        mask = scores_mask(mask, kv_heads, group)
    scores = mx.addmm(mask, q, k.swapaxes(-1, -2), alpha=scale)
    weights = mx.softmax(scores, axis=-1, precise=True)
    return (weights @ v).reshape(n, q_heads, d)


def chunk_attention(q: mx.array, k: mx.array, v: mx.array, mask: mx.array, scale: float) -> mx.array:
    """Attention of multi-token feeds (prefill chunks): q [n, t, q_heads, D] in flat order,
    k/v [n, kv_heads, L, D], mask [n, 1, t, L] additive. Returns [n, t, q_heads, D]
    (`chunk_attention_by_kv_head`, put in flat order)."""
    n, t, q_heads, d = q.shape
    return chunk_attention_by_kv_head(q, k, v, mask, scale).transpose(0, 2, 1, 3, 4).reshape(n, t, q_heads, d)


def chunk_attention_by_kv_head(q: mx.array, k: mx.array, v: mx.array, mask: mx.array, scale: float) -> mx.array:
    """chunk_attention's output as it is computed, [n, kv_heads, t, group, D] (query head
    kv_head * group + j of token i at [:, kv_head, i, j]).

    Like decode_attention, the query heads of each KV head form one matrix (t * group rows),
    so it is two batched matrix products around a softmax (the first adds the mask: mask
    [n, 1, t, L], or already laid out as the scores, batch.scores_mask). MLX's
    own attention with an array mask runs cuDNN on a CUDA GPU, whose calls cost the host far
    more than these few kernels for a short chunk over many keys (a chat's next turn after a
    long history; see batch.CHUNK_ATTENTION_MAX_TOKENS). The scores are materialised, so long
    chunks still go to the fused kernels."""
    n, t, q_heads, d = q.shape
    kv_heads = k.shape[1]
    group = q_heads // kv_heads
    q = q.reshape(n, t, kv_heads, group, d).transpose(0, 2, 1, 3, 4).reshape(n, kv_heads, t * group, d)
    if mask.shape[2] != t * group:
        mask = scores_mask(mask, kv_heads, group)
    scores = mx.addmm(mask, q, k.swapaxes(-1, -2), alpha=scale)
    weights = mx.softmax(scores, axis=-1, precise=True)
    return (weights @ v).reshape(n, kv_heads, t, group, d)


class StateBatch:
    """The recurrent state of one attention group's rows after a step, batched: per linear
    layer, (conv windows [n, K-1, C], delta-rule states [n, Hv, Dv, Dk]), row i of the
    group in row i. Rows point at the batch (`RowCache.state_batch`) instead of holding
    slices of it: a decode group whose rows stay the same reads the batch of the previous
    step as is, so a step costs no per-row work per layer."""

    def __init__(self, size: int):
        self.size = size
        self.layers: dict[int, tuple[mx.array, mx.array]] = {}


class StateGather:
    """How one group gathers its rows' recurrent state at the start of a step (computed once
    per step by the first linear layer, used by all): straight from one batch when the rows
    are that batch's rows in order; otherwise one slice or gather per source batch, one
    stack for rows holding their own state (adopted from the prefix cache) or none yet
    (zeros), and one permutation back to group order. Building it hands the rows over to
    `target`, the batch this step's new state goes into."""

    def __init__(self, caches: list):
        n = len(caches)
        first = caches[0].state_batch
        self.whole = first if (
            first is not None and first.size == n
            and all(c.state_batch is first and c.state_index == i for i, c in enumerate(caches))
        ) else None
        self.sources: list[tuple[StateBatch, object]] = []  # (batch, slice or index array)
        self.own: list[dict] = []  # standalone states, {} = none yet (zeros)
        self.permutation: mx.array | None = None
        if self.whole is None:
            by_batch: dict[int, tuple[StateBatch, list[int], list[int]]] = {}
            own_rows: list[int] = []
            for i, c in enumerate(caches):
                if c.state_batch is not None:
                    by_batch.setdefault(id(c.state_batch), (c.state_batch, [], []))
                    by_batch[id(c.state_batch)][1].append(c.state_index)
                    by_batch[id(c.state_batch)][2].append(i)
                else:
                    own_rows.append(i)
                    self.own.append(c.own_recurrent)
            order: list[int] = []
            for batch, indices, rows in by_batch.values():
                consecutive = indices == list(range(indices[0], indices[0] + len(indices)))
                picks = slice(indices[0], indices[-1] + 1) if consecutive else mx.array(indices)
                self.sources.append((batch, picks))
                order += rows
            order += own_rows
            if order != list(range(n)):
                inverse = [0] * n
                for position, row in enumerate(order):
                    inverse[row] = position
                self.permutation = mx.array(inverse)
        self.target = StateBatch(n)
        for i, c in enumerate(caches):
            c.state_batch, c.state_index, c.own_recurrent = self.target, i, {}

    def gather(self, layer: int, zeros: Callable[[], tuple[mx.array, mx.array]]) -> tuple[mx.array, mx.array]:
        if self.whole is not None:
            return self.whole.layers[layer]
        windows, states = [], []
        for batch, picks in self.sources:
            w, s = batch.layers[layer]
            windows.append(w[picks])
            states.append(s[picks])
        if self.own:
            pairs = [own.get(layer) or zeros() for own in self.own]
            windows.append(mx.stack([w for w, _ in pairs]))
            states.append(mx.stack([s for _, s in pairs]))
        window = windows[0] if len(windows) == 1 else mx.concatenate(windows)
        state = states[0] if len(states) == 1 else mx.concatenate(states)
        if self.permutation is not None:
            window, state = window[self.permutation], state[self.permutation]
        return window, state


def state_arrays(caches) -> list[mx.array]:
    """The recurrent-state arrays behind some rows, each batch once (for evaluation)."""
    seen: dict[int, object] = {}
    out: list[mx.array] = []
    for c in caches:
        source = c.state_batch if c.state_batch is not None else c.own_recurrent
        if id(source) not in seen:
            seen[id(source)] = source
            pairs = source.layers.values() if c.state_batch is not None else source.values()
            out += [a for pair in pairs for a in pair]
    return out


@dataclass
class Snapshot:
    """State of one row at a token boundary (see module docstring)."""

    length: int
    recurrent: dict | None = None


@dataclass(eq=False)
class RowCache:
    """One row's view of the model state: its slot and length, and the prefix-cache keys of
    its full blocks (kept by PrefixCache; `trim` drops those it invalidates)."""

    kv: KVStore
    shelf: Shelf | None = None
    slot: int | None = None
    length: int = 0
    block_keys: list[int] = field(default_factory=list)
    states: dict = field(default_factory=dict)  # block index -> recurrent snapshot at its end
    # Hybrid models: the row's recurrent state after its last token is row `state_index` of
    # `state_batch` (its group's batch, see StateBatch) or, when not in a batch,
    # `own_recurrent`: linear-layer index -> (conv window, delta-rule state).
    state_batch: StateBatch | None = None
    state_index: int = 0
    own_recurrent: dict = field(default_factory=dict)
    # Set by the prefix cache: called with (row, kept blocks) when trim invalidates blocks.
    on_trim: Callable[[RowCache, int], None] | None = None

    @property
    def capacity(self) -> int:
        return self.shelf.capacity if self.shelf is not None else 0

    def reserve(self, n: int, may_wait: bool = False) -> None:
        """Make sure positions [length, length + n) fit: take a slot, or move to a bigger one
        (a quarter of headroom, so a decoding row does not move again at once). `may_wait`:
        see KVStore.acquire (GrowthPending)."""
        needed = self.length + n
        if needed <= self.capacity:
            return
        want = needed + needed // 4
        if self.kv.max_row_tokens is not None:
            want = max(needed, min(want, self.kv.max_row_tokens))
        try:
            shelf, slot = self.kv.acquire(self, want, may_wait)
        except OutOfKVMemory:
            if self.kv.capacity_for(needed) == self.kv.capacity_for(want):
                raise
            shelf, slot = self.kv.acquire(self, needed, may_wait)  # the headroom is what did not fit
        if self.shelf is not None:
            # acquire() may have compacted other shelves, never ours: self.slot is current.
            if self.length:
                self.kv.copy(self.shelf, self.slot, shelf, slot, self.length)
            self.shelf.give_back(self.slot)
        self.shelf, self.slot = shelf, slot

    def extend(self, n: int) -> None:
        """Count n tokens written by the last forward pass as part of the row."""
        assert self.length + n <= self.capacity, "extend past the reserved slot"
        self.length += n

    def trim(self, n: int) -> None:
        """Forget the last n tokens."""
        assert 0 <= n <= self.length
        self.length -= n
        kept = self.length // self.kv.block_size
        if len(self.block_keys) > kept and self.on_trim is not None:
            self.on_trim(self, kept)
        for i in [i for i in self.states if i >= kept]:
            del self.states[i]

    @property
    def recurrent(self) -> dict:
        """Linear-layer index -> (conv window, delta-rule state). Arrays are immutable values,
        so a snapshot is a shallow copy of this dict (of views into a batch, when batched)."""
        if self.state_batch is None:
            return self.own_recurrent
        i = self.state_index
        return {layer: (w[i], s[i]) for layer, (w, s) in self.state_batch.layers.items()}

    @recurrent.setter
    def recurrent(self, value: dict) -> None:
        self.state_batch, self.own_recurrent = None, value

    def snapshot(self) -> Snapshot:
        return Snapshot(length=self.length, recurrent=dict(self.recurrent))

    def restore(self, snap: Snapshot) -> None:
        if snap.length > self.length:
            raise ValueError("cannot restore a snapshot ahead of the row")
        self.trim(self.length - snap.length)
        self.recurrent = dict(snap.recurrent or {})

    def state_arrays(self) -> list[mx.array]:
        return state_arrays([self])

    def release(self) -> None:
        """Give the slot back (request finished, cancelled or preempted)."""
        self.trim(self.length)
        self.recurrent = {}
        if self.shelf is not None:
            self.shelf.give_back(self.slot)
        self.shelf = self.slot = None
