"""Shared prefix cache: full KV blocks of earlier requests, reused by later ones.

A full block is identified by the tokens it holds and everything before it: its key is the
hash of (parent key, the block's tokens). A new request walks its prompt block by block and
adopts the longest run of cached blocks, prefilling only the rest. A chat's next turn thus
reuses the previous turn's KV.

The cache holds one reference on each of its blocks (see BlockAllocator), so a block in use
by a row is never freed. When the pool needs room, the least recently used cached blocks
that nobody else references are evicted, leaves first (a parent stays while a child is
cached, so every cached chain stays reachable from its root).

Hybrid models keep recurrent state that cannot be rebuilt from KV blocks: a block may carry
a state snapshot taken at its end, and a match for such a model must end on a block that
has one (`need_state`).
"""

from __future__ import annotations

import heapq
import itertools
from dataclasses import dataclass, field

from .cache import PagedKVCache


@dataclass
class CachedBlock:
    key: int
    parent: int | None
    block: int
    last_used: int
    children: set = field(default_factory=set)
    state: object | None = None  # recurrent-state snapshot at the end of this block


@dataclass
class PrefixStats:
    queried_tokens: int = 0
    hit_tokens: int = 0
    evicted_blocks: int = 0

    def as_dict(self) -> dict:
        rate = self.hit_tokens / self.queried_tokens if self.queried_tokens else 0.0
        return {
            "prefix_queried_tokens": self.queried_tokens,
            "prefix_hit_tokens": self.hit_tokens,
            "prefix_hit_rate": round(rate, 4),
            "prefix_evicted_blocks": self.evicted_blocks,
        }


class PrefixCache:
    def __init__(self, kv: PagedKVCache):
        self.kv = kv
        self.block_size = kv.block_size
        self.entries: dict[int, CachedBlock] = {}
        self._clock = itertools.count()
        self.stats = PrefixStats()
        kv.reclaim = self.evict
        kv.evictable = self.evictable_blocks

    # ---- lookup ------------------------------------------------------------------------
    def match(self, tokens: list[int], need_state: bool = False) -> tuple[list[int], int, object | None]:
        """Longest cached prefix of `tokens` as (block ids, tokens covered, state snapshot).

        At least one token is always left uncovered: the request must feed something to get
        logits for its next token.
        """
        bs = self.block_size
        usable = (len(tokens) - 1) // bs
        chain: list[CachedBlock] = []
        parent = None
        for i in range(usable):
            key = _block_key(parent, tokens[i * bs : (i + 1) * bs])
            entry = self.entries.get(key)
            if entry is None:
                break
            chain.append(entry)
            parent = key
        if need_state:
            while chain and chain[-1].state is None:
                chain.pop()
        now = next(self._clock)
        for entry in chain:
            entry.last_used = now
        self.stats.queried_tokens += len(tokens)
        self.stats.hit_tokens += len(chain) * bs
        state = chain[-1].state if chain else None
        return [e.block for e in chain], len(chain) * bs, state

    # ---- insertion ---------------------------------------------------------------------
    def insert(self, tokens: list[int], block_table: list[int], length: int, states: dict | None = None) -> None:
        """Register the full blocks among the first `length` tokens of a row.

        `states` optionally maps a block index to the recurrent snapshot at its end.
        If a block's key is already cached under another block id (two rows computed the
        same prefix at once), registration stops there: every cached chain then runs
        through blocks its users hold, so a block held only by the cache never has a
        descendant that a row holds.
        """
        bs = self.block_size
        parent = None
        now = next(self._clock)
        for i in range(length // bs):
            key = _block_key(parent, tokens[i * bs : (i + 1) * bs])
            entry = self.entries.get(key)
            if entry is None:
                block = block_table[i]
                self.kv.allocator.retain(block)
                entry = CachedBlock(key=key, parent=parent, block=block, last_used=now)
                self.entries[key] = entry
                if parent is not None:
                    self.entries[parent].children.add(key)
            elif entry.block != block_table[i]:
                break
            entry.last_used = now
            if states and i in states and entry.state is None:
                entry.state = states[i]
            parent = key

    # ---- eviction ----------------------------------------------------------------------
    def evict(self, wanted: int) -> int:
        """Free up to `wanted` pool blocks held only by the cache, least recently used leaf
        first (a parent whose last child goes becomes a leaf in turn). Returns how many."""
        refcount = self.kv.allocator.refcount

        def evictable_leaf(entry: CachedBlock) -> bool:
            return not entry.children and refcount[entry.block] == 1

        # One heap for the whole call, not a rescan per block: a long prompt's admission
        # may evict hundreds of blocks from a large cache.
        leaves = [(e.last_used, e.key) for e in self.entries.values() if evictable_leaf(e)]
        heapq.heapify(leaves)
        freed = 0
        while freed < wanted and leaves:
            entry = self.entries[heapq.heappop(leaves)[1]]
            parent = self.entries.get(entry.parent) if entry.parent is not None else None
            self._drop(entry)
            freed += 1
            if parent is not None and evictable_leaf(parent):
                heapq.heappush(leaves, (parent.last_used, parent.key))
        self.stats.evicted_blocks += freed
        return freed

    def evictable_blocks(self) -> int:
        """Blocks that eviction could free right now: those held by the cache alone. (A row
        holding a cached block holds its whole chain, so these are whole subtrees and
        leaf-first eviction reaches all of them.)"""
        return sum(1 for e in self.entries.values() if self.kv.allocator.refcount[e.block] == 1)

    @property
    def cached_blocks(self) -> int:
        return len(self.entries)

    @property
    def cached_bytes(self) -> int:
        return len(self.entries) * self.kv.bytes_per_block

    def clear(self) -> None:
        for entry in list(self.entries.values()):
            self.kv.allocator.release(entry.block)
        self.entries.clear()

    def _drop(self, entry: CachedBlock) -> None:
        del self.entries[entry.key]
        if entry.parent is not None and entry.parent in self.entries:
            self.entries[entry.parent].children.discard(entry.key)
        self.kv.allocator.release(entry.block)


def _block_key(parent: int | None, tokens: list[int]) -> int:
    return hash((parent, tuple(tokens)))
