"""Per-request model state: attention K/V in shared paged pools, and the four cache verbs.

Attention K/V of every row lives in one pool per layer, shape [num_blocks * block_size,
kv_heads, head_dim], cut into fixed-size blocks. A row owns a block table (list of block
ids) and a length. Blocks are reference counted so that the prefix cache can share full
blocks between requests without copying.

The cache protocol every model kind supports, per row (see `RowCache`):
  extend(n)      make room for n more tokens (allocates blocks; the forward pass writes them)
  trim(n)        forget the last n tokens (attention only; used to roll back rejected drafts)
  snapshot()     remember the state at the current length
  restore(snap)  go back to a snapshot (attention: trim to its length; recurrent layers:
                 put the saved state back)
Attention K/V below a row's length is never rewritten, so a snapshot of attention state is
just a length; recurrent state (hybrid models) is saved by reference, MLX arrays being
immutable values.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import mlx.core as mx

from .batch import StepBatch


class OutOfBlocks(RuntimeError):
    """The pool has no free block and may not grow further."""


class BlockAllocator:
    """Free list and reference counts of the pool's blocks."""

    def __init__(self, num_blocks: int):
        self.refcount = [0] * num_blocks
        self.free_list = list(range(num_blocks - 1, -1, -1))  # pop() hands out low ids first

    @property
    def num_blocks(self) -> int:
        return len(self.refcount)

    @property
    def num_free(self) -> int:
        return len(self.free_list)

    def add_blocks(self, n: int) -> None:
        start = self.num_blocks
        self.refcount.extend([0] * n)
        # Keep low ids first so that a row's blocks tend to be consecutive.
        self.free_list = list(range(start + n - 1, start - 1, -1)) + self.free_list

    def allocate(self, prefer: int | None = None) -> int:
        """Hand out a free block, preferring `prefer` (the id after a row's last block)
        so that a lone row stays contiguous and its keys can be read without a gather."""
        if not self.free_list:
            raise OutOfBlocks("no free KV block")
        if prefer is not None and prefer < self.num_blocks and self.refcount[prefer] == 0:
            self.free_list.remove(prefer)
            block = prefer
        else:
            block = self.free_list.pop()
        self.refcount[block] = 1
        return block

    def retain(self, block: int) -> None:
        assert self.refcount[block] > 0, "retain of a free block"
        self.refcount[block] += 1

    def release(self, block: int) -> None:
        assert self.refcount[block] > 0, "double free of a KV block"
        self.refcount[block] -= 1
        if self.refcount[block] == 0:
            self.free_list.append(block)


class PagedKVCache:
    """The K/V pools of all attention layers of one model, and paged attention over them."""

    def __init__(
        self,
        num_layers: int,
        kv_heads: int,
        head_dim: int,
        dtype: mx.Dtype,
        block_size: int = 64,
        initial_blocks: int = 64,
        max_blocks: int | None = None,
    ):
        self.num_layers = num_layers
        self.kv_heads = kv_heads
        self.head_dim = head_dim
        self.dtype = dtype
        self.block_size = block_size
        self.max_blocks = max_blocks
        self.allocator = BlockAllocator(initial_blocks)
        # Set by the prefix cache: frees up to n blocks it alone holds, returns how many.
        self.reclaim: Callable[[int], int] | None = None
        self.evictable: Callable[[], int] | None = None
        shape = (initial_blocks * block_size, kv_heads, head_dim)
        self.keys = [mx.zeros(shape, dtype=dtype) for _ in range(num_layers)]
        self.values = [mx.zeros(shape, dtype=dtype) for _ in range(num_layers)]
        mx.eval(self.keys, self.values)

    # ---- memory -------------------------------------------------------------------------
    @property
    def bytes_per_block(self) -> int:
        return 2 * self.num_layers * self.block_size * self.kv_heads * self.head_dim * self.dtype.size

    @property
    def bytes_allocated(self) -> int:
        return self.bytes_per_block * self.allocator.num_blocks

    @property
    def bytes_in_use(self) -> int:
        """Bytes of blocks that some request holds (blocks kept only by the prefix cache
        are reclaimable and not counted)."""
        held_by_cache_only = self.evictable() if self.evictable is not None else 0
        return self.bytes_per_block * (self.allocator.num_blocks - self.allocator.num_free - held_by_cache_only)

    def can_grow(self) -> bool:
        return self.max_blocks is None or self.allocator.num_blocks < self.max_blocks

    def grow(self, at_least: int = 1) -> None:
        """Enlarge the pools by at least `at_least` blocks, at least doubling them (bounded by
        max_blocks). Copies every layer's pool, a pause for every running stream, so it
        happens rarely and in one go."""
        if not self.can_grow():
            raise OutOfBlocks("KV memory budget reached")
        old = self.allocator.num_blocks
        new = max(old * 2, old + at_least)
        if self.max_blocks is not None:
            new = min(new, self.max_blocks)
        extra = (new - old) * self.block_size
        pad = mx.zeros((extra, self.kv_heads, self.head_dim), dtype=self.dtype)
        self.keys = [mx.concatenate([k, pad]) for k in self.keys]
        self.values = [mx.concatenate([v, pad]) for v in self.values]
        mx.eval(self.keys, self.values)
        self.allocator.add_blocks(new - old)

    def ensure_free(self, n: int) -> None:
        """Make n blocks free: first evict cached prefixes (exactly as many as missing, least
        recently used first), then grow the pools while under budget.

        Evicting first keeps the pools as large as the requests' working set, with the
        prefix cache living in the slack: on back-ends that copy a buffer on every update
        (MLX's CUDA back-end does not update in place) a step's cost grows with pool size.
        """
        while self.allocator.num_free < n:
            if self.reclaim is not None and self.reclaim(n - self.allocator.num_free) > 0:
                continue
            if not self.can_grow():
                raise OutOfBlocks("KV memory budget reached")
            self.grow(n - self.allocator.num_free)

    # ---- attention ----------------------------------------------------------------------
    def attend(
        self,
        layer: int,
        queries: mx.array,
        keys: mx.array,
        values: mx.array,
        batch: StepBatch,
        scale: float,
    ) -> mx.array:
        """Write the step's new K/V into the pool, then attend per group.

        queries [T, q_heads, D], keys/values [T, kv_heads, D] (RoPE already applied).
        Returns [T, q_heads * D] in flat order.
        """
        pool_k, pool_v = self.keys[layer], self.values[layer]
        pool_k[batch.slots] = keys
        pool_v[batch.slots] = values
        q_heads, d = queries.shape[1], queries.shape[2]
        bs = self.block_size
        outputs = []
        for g in batch.groups:
            n, t = g.n_rows, g.tokens_per_row
            q = queries[g.offset : g.offset + n * t].reshape(n, t, q_heads, d).transpose(0, 2, 1, 3)
            if g.contiguous_start is not None:
                s = g.contiguous_start
                k = pool_k[s : s + g.key_length][None].transpose(0, 2, 1, 3)
                v = pool_v[s : s + g.key_length][None].transpose(0, 2, 1, 3)
                mask = None if t == 1 else "causal"
            else:
                length = g.key_length
                # Gather whole blocks as rows of a 2-D view: measured 1.6x faster than
                # fancy indexing on MLX's CUDA back-end (H100, 32 rows x 9 blocks).
                blocks = g.block_table.reshape(-1)
                block_elems = bs * self.kv_heads * d
                k = mx.take(pool_k.reshape(-1, block_elems), blocks, axis=0)
                v = mx.take(pool_v.reshape(-1, block_elems), blocks, axis=0)
                k = k.reshape(n, length, self.kv_heads, d).transpose(0, 2, 1, 3)
                v = v.reshape(n, length, self.kv_heads, d).transpose(0, 2, 1, 3)
                # Key j is visible to the query at position p iff j <= p: this is both the
                # causal rule and the cut-off of the row's padding.
                mask = mx.arange(length)[None, None, None, :] <= g.positions[:, None, :, None]
            o = mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask=mask)
            outputs.append(o.transpose(0, 2, 1, 3).reshape(n * t, q_heads * d))
        return outputs[0] if len(outputs) == 1 else mx.concatenate(outputs)


@dataclass
class Snapshot:
    """State of one row at a token boundary (see module docstring)."""

    length: int
    recurrent: object | None = None


@dataclass
class RowCache:
    """One row's view of the model state: its block table and length (+ recurrent slot)."""

    kv: PagedKVCache
    block_table: list[int] = field(default_factory=list)
    length: int = 0

    @property
    def capacity(self) -> int:
        return len(self.block_table) * self.kv.block_size

    def blocks_needed(self, n: int) -> int:
        """How many new blocks extend(n) would allocate."""
        need = -(-(self.length + n) // self.kv.block_size)
        return max(0, need - len(self.block_table))

    def reserve(self, n: int) -> None:
        """Allocate blocks so that positions [length, length + n) have slots."""
        needed = self.blocks_needed(n)
        self.kv.ensure_free(needed)
        for _ in range(needed):
            prefer = self.block_table[-1] + 1 if self.block_table else None
            self.block_table.append(self.kv.allocator.allocate(prefer))

    def extend(self, n: int) -> None:
        """Count n tokens written by the last forward pass as part of the row."""
        assert self.length + n <= self.capacity, "extend past reserved blocks"
        self.length += n

    def trim(self, n: int) -> None:
        """Forget the last n tokens and free blocks that no longer hold any."""
        assert 0 <= n <= self.length
        self.length -= n
        keep = -(-self.length // self.kv.block_size)
        for block in self.block_table[keep:]:
            self.kv.allocator.release(block)
        del self.block_table[keep:]

    def snapshot(self) -> Snapshot:
        return Snapshot(length=self.length)

    def restore(self, snap: Snapshot) -> None:
        if snap.length > self.length:
            raise ValueError("cannot restore a snapshot ahead of the row")
        self.trim(self.length - snap.length)

    def adopt_prefix(self, blocks: list[int], length: int) -> None:
        """Start the row from shared, already written blocks (the prefix cache)."""
        assert not self.block_table and self.length == 0
        for block in blocks:
            self.kv.allocator.retain(block)
        self.block_table = list(blocks)
        self.length = length

    def release(self) -> None:
        """Give every block back (request finished, cancelled or preempted); trimming to
        zero also frees blocks that were reserved but never written."""
        self.trim(self.length)
