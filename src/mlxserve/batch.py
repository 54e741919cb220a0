"""What one forward pass of the model sees: the step's tokens, flattened across rows.

A step feeds several rows at once. Row r contributes `t_r` new tokens (1 for a decode row,
k+1 for a row verifying k draft tokens, a chunk for a prefilling row). All new tokens are
concatenated into one flat sequence so that every weight matrix is read once per step.
Attention is the only part that needs to know about rows: rows with the same `t` form an
`AttentionGroup` that runs as one batched attention call.
"""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx
import numpy as np


@dataclass
class AttentionGroup:
    """Rows that feed the same number of new tokens this step.

    Flat tokens [offset, offset + n_rows * tokens_per_row) belong to this group, row-major.
    """

    offset: int
    n_rows: int
    tokens_per_row: int
    positions: mx.array  # [n_rows, tokens_per_row] absolute position of each new token
    block_table: mx.array | None  # [n_rows, max_blocks] pool block ids (gather path)
    contiguous_start: int | None  # single row whose blocks are contiguous: first slot
    key_length: int  # keys to attend over: padded length (gather) or exact length


@dataclass
class StepBatch:
    """Inputs of one forward pass."""

    tokens: mx.array  # [T] int32, flat
    positions: mx.array  # [T] int32
    slots: mx.array  # [T] int32: pool slot that receives each new token's K/V
    groups: list[AttentionGroup]
    logit_rows: mx.array  # indices into the flat tokens whose logits are wanted
    row_logits: list  # per row in flat order: (row key, first logits row, number of logits rows)
    row_offsets: dict  # row key -> index of its first token in the flat sequence


def build_batch(rows: list, block_size: int) -> StepBatch:
    """Build a StepBatch from per-row feeds.

    `rows` holds objects with: key, tokens (list[int] new tokens), start (position of the
    first new token), block_table (list[int] covering start + len(tokens) positions) and
    logits (which of the new tokens need logits: "last", "all" or "none").
    Rows are grouped by token count; the flat order is group by group so that each group is
    one contiguous slice of the flat sequence.
    """
    by_count: dict[int, list] = {}
    for row in rows:
        by_count.setdefault(len(row.tokens), []).append(row)

    tokens: list[int] = []
    positions: list[int] = []
    slots: list[int] = []
    logit_rows: list[int] = []
    row_logits: list = []
    row_offsets: dict = {}
    groups: list[AttentionGroup] = []
    for t, members in sorted(by_count.items()):
        offset = len(tokens)
        pos = np.empty((len(members), t), dtype=np.int32)
        for i, row in enumerate(members):
            base = len(tokens)
            row_offsets[row.key] = base
            tokens.extend(row.tokens)
            p = np.arange(row.start, row.start + t, dtype=np.int32)
            pos[i] = p
            positions.extend(p.tolist())
            table = np.asarray(row.block_table, dtype=np.int64)
            slots.extend((table[p // block_size] * block_size + p % block_size).tolist())
            first = len(logit_rows)
            if row.logits == "all":
                logit_rows.extend(range(base, base + t))
            elif row.logits == "last":
                logit_rows.append(base + t - 1)
            row_logits.append((row.key, first, len(logit_rows) - first))
        key_length = max(row.start + t for row in members)
        contiguous_start = None
        block_table = None
        if len(members) == 1 and _is_contiguous(members[0].block_table, key_length, block_size):
            contiguous_start = members[0].block_table[0] * block_size
        else:
            max_blocks = -(-key_length // block_size)
            table = np.zeros((len(members), max_blocks), dtype=np.int32)
            for i, row in enumerate(members):
                used = row.block_table[:max_blocks]
                table[i, : len(used)] = used
            block_table = mx.array(table)
            key_length = max_blocks * block_size
        groups.append(
            AttentionGroup(
                offset=offset,
                n_rows=len(members),
                tokens_per_row=t,
                positions=mx.array(pos),
                block_table=block_table,
                contiguous_start=contiguous_start,
                key_length=key_length,
            )
        )
    return StepBatch(
        tokens=mx.array(np.asarray(tokens, dtype=np.int32)),
        positions=mx.array(np.asarray(positions, dtype=np.int32)),
        slots=mx.array(np.asarray(slots, dtype=np.int32)),
        groups=groups,
        logit_rows=mx.array(np.asarray(logit_rows, dtype=np.int32)),
        row_logits=row_logits,
        row_offsets=row_offsets,
    )


def _is_contiguous(block_table: list[int], length: int, block_size: int) -> bool:
    """True when the blocks holding the first `length` positions are consecutive ids."""
    needed = -(-length // block_size)
    first = block_table[0]
    return all(block_table[i] == first + i for i in range(needed))
