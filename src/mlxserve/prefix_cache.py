"""Shared prefix cache: the KV of earlier and running requests, reused by later ones.

Token blocks (block_size tokens) are the unit of matching. A full block is identified by
the tokens it holds and everything before it: its key is the hash of (parent key, the
block's tokens). Every slot (cache.py) whose row registered its blocks is a *holder* of
those keys: running rows, and finished or preempted rows whose slot the cache keeps
(`KeptSlot`). A new request walks its prompt block by block, finds the holder of the longest
run of its blocks, and starts from there, prefilling only the rest:
  - from a kept slot whose blocks it matches all of, it takes the slot over: no copy at all
    (a chat's next turn, or a preempted row coming back, continues in the very slot it left);
  - otherwise (a running row, or a kept slot it shares only a beginning with: another
    conversation with the same system prompt) it copies that many positions into a slot of
    its own, and the holder keeps its blocks.
A kept slot also remembers the tokens it holds, so a match that ends in it goes on token by
token past its last full block, as far as the two agree: a chat's next turn then feeds only
what is new since the last answer (its follow-up, and the answer's last token, whose KV was
never computed), not up to block_size - 1 tokens of the answer again.
Each key lists its holders (a reference count: a kept slot is only evicted when no running
row is in it, which is true by construction as running rows own their slots). When memory is
needed, kept slots are evicted least recently used first; the bytes they free are counted
in whole slots.

Hybrid models keep recurrent state that cannot be rebuilt from KV: a holder may carry a state
snapshot at the end of a block, and a match for such a model must end on a block that has
one (`need_state`).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

from .cache import KVStore, OutOfKVMemory, RowCache, Shelf


@dataclass(eq=False)
class KeptSlot:
    """A slot that no row owns any more, kept for its blocks."""

    shelf: Shelf
    slot: int
    length: int
    block_keys: list[int]
    states: dict
    last_used: int
    tokens: list[int]  # the tokens whose KV the slot holds (its first `length` positions)


@dataclass
class Match:
    holder: RowCache | KeptSlot | None
    length: int  # tokens covered
    state: object | None = None  # recurrent snapshot at `length` (hybrid models)


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


@dataclass
class PrefixCache:
    kv: KVStore
    holders: dict[int, set] = field(default_factory=dict)  # block key -> holders of that block
    kept: dict[int, KeptSlot] = field(default_factory=dict)  # id -> kept slot
    stats: PrefixStats = field(default_factory=PrefixStats)

    def __post_init__(self):
        self.block_size = self.kv.block_size
        self._clock = itertools.count()
        self.kv.reclaim = self.evict

    # ---- lookup ------------------------------------------------------------------------
    def match(self, tokens: list[int], need_state: bool = False) -> Match:
        """The holder of the longest cached full-block prefix of `tokens` (longer, to the
        token, where it ends in a kept slot whose tokens go on agreeing).

        At least one token is always left uncovered: the request must feed something to get
        logits for its next token. A kept slot the match covers whole is preferred (taking it
        over costs no copy).
        """
        bs = self.block_size
        best = Match(None, 0)
        parent = None
        for i in range((len(tokens) - 1) // bs):
            key = _block_key(parent, tokens[i * bs : (i + 1) * bs])
            found = self.holders.get(key)
            if not found:
                break
            parent = key
            candidates = [h for h in found if not need_state or i in h.states]
            if candidates:
                holder = min(candidates, key=lambda h: not _covered_whole(h, i + 1))
                best = Match(holder, (i + 1) * bs, holder.states.get(i))
        if isinstance(best.holder, KeptSlot) and not need_state:
            # On past the full blocks, token by token (a hybrid model's match must end where
            # a recurrent snapshot was taken: at a block's end).
            best.length += common_prefix_length(tokens[best.length : len(tokens) - 1], best.holder.tokens[best.length :])
        if isinstance(best.holder, KeptSlot):
            best.holder.last_used = next(self._clock)
        return best

    def record(self, queried_tokens: int, hit_tokens: int) -> None:
        """Count a request's lookup in the stats, once it is admitted (a request waiting for
        memory looks up again at every step)."""
        self.stats.queried_tokens += queried_tokens
        self.stats.hit_tokens += hit_tokens

    def adopt(self, row: RowCache, match: Match) -> None:
        """Start an empty row from a match: take over a kept slot it covers whole, or copy
        the holder's positions into a slot of its own (which may raise OutOfKVMemory, or
        GrowthPending: the row is being admitted and can wait)."""
        assert row.shelf is None and row.length == 0
        blocks = match.length // self.block_size
        source = match.holder
        taken_over = _covered_whole(source, blocks) or not self._reserve_copy(row, source, match.length)
        if taken_over:
            self._forget(source, blocks)
            del self.kept[id(source)]
            source.shelf.holders[source.slot] = row
            row.shelf, row.slot = source.shelf, source.slot
        else:
            self.kv.copy(source.shelf, source.slot, row.shelf, row.slot, match.length)
        row.length = match.length
        row.block_keys = source.block_keys[:blocks]
        row.states = {i: s for i, s in source.states.items() if i < blocks}
        row.recurrent = dict(match.state) if match.state is not None else {}
        for key in row.block_keys:
            if taken_over:
                self.holders[key].discard(source)
            self.holders[key].add(row)
        row.on_trim = self._forget

    def _reserve_copy(self, row: RowCache, source, length: int) -> bool:
        """A slot for `row` to copy `length` positions of `source` into. When there is no
        memory for it and the source is a kept slot, False: better to take that slot over,
        losing its later blocks, than to make the request wait. (OutOfKVMemory otherwise.)"""
        kept = isinstance(source, KeptSlot)
        if kept:  # not to be evicted to make room for its own copy
            del self.kept[id(source)]
        try:
            row.reserve(length, may_wait=True)
            return True
        except OutOfKVMemory:
            if not kept:
                raise
            return False
        finally:
            if kept:
                self.kept[id(source)] = source

    # ---- registration ------------------------------------------------------------------
    def insert(self, tokens: list[int], row: RowCache, length: int, states: dict | None = None) -> None:
        """Register the full blocks among the first `length` tokens of a row (`states`
        optionally maps a block index to the recurrent snapshot at its end)."""
        bs = self.block_size
        row.on_trim = self._forget
        parent = row.block_keys[-1] if row.block_keys else None
        for i in range(len(row.block_keys), length // bs):
            key = _block_key(parent, tokens[i * bs : (i + 1) * bs])
            self.holders.setdefault(key, set()).add(row)
            row.block_keys.append(key)
            parent = key
        if states:
            row.states.update(states)

    def release(self, row: RowCache, tokens: list[int]) -> None:
        """A row is done with its slot: keep the slot if it holds any full block, else free it.
        `tokens`: the row's tokens, at least those of the positions it computed."""
        if row.shelf is None or not row.block_keys:
            row.release()
            return
        kept = KeptSlot(row.shelf, row.slot, row.length, row.block_keys, row.states, next(self._clock),
                        list(tokens[: row.length]))
        self.kept[id(kept)] = kept
        row.shelf.holders[row.slot] = kept
        for key in kept.block_keys:
            self.holders[key].discard(row)
            self.holders[key].add(kept)
        row.shelf = row.slot = None
        row.length = 0
        row.block_keys, row.states = [], {}
        # A preempted row recomputes from where a later match leaves it (adopt sets that
        # state), or from position 0 with no state at all: never from the state it had.
        row.recurrent = {}

    def _forget(self, holder, kept_blocks: int) -> None:
        """Unregister a holder's blocks from index `kept_blocks` on."""
        for key in holder.block_keys[kept_blocks:]:
            found = self.holders.get(key)
            if found is not None:
                found.discard(holder)
                if not found:
                    del self.holders[key]
        del holder.block_keys[kept_blocks:]

    # ---- eviction ----------------------------------------------------------------------
    def evict(self, shelf: Shelf | None = None) -> bool:
        """Free the least recently used kept slot (on `shelf`, if given). False if none."""
        candidates = [k for k in self.kept.values() if shelf is None or k.shelf is shelf]
        if not candidates:
            return False
        victim = min(candidates, key=lambda k: k.last_used)
        self.stats.evicted_blocks += len(victim.block_keys)
        self._forget(victim, 0)
        del self.kept[id(victim)]
        victim.shelf.give_back(victim.slot)
        return True

    @property
    def cached_blocks(self) -> int:
        return len(self.holders)

    @property
    def cached_bytes(self) -> int:
        """Bytes of the slots kept for reuse (running rows' slots are theirs)."""
        return sum(k.shelf.slot_bytes for k in self.kept.values())

    def clear(self) -> None:
        while self.evict():
            pass


def _covered_whole(holder, blocks: int) -> bool:
    """Whether a match of `blocks` blocks covers all of a kept slot's blocks (so that taking
    it over loses nothing)."""
    return isinstance(holder, KeptSlot) and blocks == len(holder.block_keys)


def common_prefix_length(a: list[int], b: list[int]) -> int:
    """How many tokens `a` and `b` agree on from their start. Compared 64 at a time first
    (list slices compare in C), so two long prompts that share thousands of tokens cost a few
    dozen Python steps, not one per token."""
    end = min(len(a), len(b))
    n = 0
    while n + 64 <= end and a[n : n + 64] == b[n : n + 64]:
        n += 64
    while n < end and a[n] == b[n]:
        n += 1
    return n


def _block_key(parent: int | None, tokens: list[int]) -> int:
    return hash((parent, tuple(tokens)))
