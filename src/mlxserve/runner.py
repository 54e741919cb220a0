"""Runs one forward pass for a step's rows and returns the logits that were asked for."""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn

from .batch import StepBatch, build_batch, fuses_decoding
from .cache import KVStore, RowCache
from .models import compiled


@dataclass
class Feed:
    """One row's part of a step: new tokens starting at `start`, written into the slot of
    `cache` (a RowCache); `logits` says which positions need logits ("last", "all", "none", or
    an int n: the last n)."""

    key: object
    tokens: list[int]
    start: int
    cache: RowCache
    logits: str | int
    from_previous: int | None = None  # the (single) token is element i of the previous step's samples


class Runner:
    def __init__(self, model: nn.Module, kv: KVStore, capture: tuple[int, ...] = ()):
        self.model = model
        self.kv = kv
        # Layers whose outputs every step hands back as StepBatch.captured (a DFlash draft's context).
        self.capture = capture
        args = getattr(model, "args", None)
        group = args.num_attention_heads // kv.kv_heads if args is not None else 1  # query heads per KV head
        self.fuse_decoding = fuses_decoding(kv.dtype, kv.head_dim, group)  # (decided once, not every step)

    def forward(self, feeds: list[Feed], previous: mx.array | None = None) -> tuple[mx.array | None, StepBatch]:
        """Returns (logits [rows asked for, vocab] in the batch's flat order, or None when no
        feed asks for logits; the batch).

        `previous` holds the last step's sampled tokens, still on the device: decode rows
        read their input from it (Feed.from_previous) so the host need not wait for them.
        The result is lazy: the caller evaluates it together with whatever it samples.
        """
        # Steps with prefill chunks are padded to a bucket size only to be run compiled.
        batch = build_batch(feeds, self.kv.dtype, self.kv.block_size, compiled.multi_token_bucket(),
                            compiled.MAX_TOKENS_PER_ROW, self.fuse_decoding)
        batch.capture = self.capture
        patches = [(batch.row_offsets[f.key], f.from_previous) for f in feeds if f.from_previous is not None]
        if len(patches) == batch.tokens.size:
            # Every row decodes its token from last step (the steady state): the step's input
            # is last step's samples, reordered if need be; no scatter.
            src = [s for _, s in sorted(patches)]
            batch.tokens = previous if src == list(range(previous.size)) else previous[mx.array(src)]
        elif patches:
            dest, src = zip(*patches)
            batch.tokens[mx.array(dest)] = previous[mx.array(src)]
        return self.model(batch, self.kv), batch
