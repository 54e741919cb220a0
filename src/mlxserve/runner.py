"""Runs one forward pass for a step's rows and returns the logits that were asked for."""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn

from .batch import StepBatch, build_batch
from .cache import PagedKVCache


@dataclass
class Feed:
    """One row's part of a step: new tokens starting at `start`, written into the blocks of
    `block_table`; `logits` says which positions need logits ("last", "all" or "none")."""

    key: object
    tokens: list[int]
    start: int
    block_table: list[int]
    logits: str


class Runner:
    def __init__(self, model: nn.Module, kv: PagedKVCache):
        self.model = model
        self.kv = kv

    def forward(self, feeds: list[Feed]) -> tuple[mx.array, StepBatch]:
        """Returns (logits [rows asked for, vocab] in the batch's flat order, the batch).

        The result is lazy: the caller evaluates it together with whatever it samples.
        """
        batch = build_batch(feeds, self.kv.block_size)
        return self.model(batch, self.kv), batch
