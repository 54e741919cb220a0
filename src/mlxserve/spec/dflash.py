"""DFlash drafting: a small block-diffusion model that drafts a whole block in one forward pass.

A DFlash draft (z-lab, "DFlash: Block Diffusion for Flash Speculative Decoding") is a few
Qwen3-style decoder layers that borrow the target model's token embedding and LM head. Its
input is a block: the row's newest token (the anchor) followed by k mask tokens. Its
context is the target's own hidden states: the outputs of a few target layers
(`target_layer_ids`), concatenated per position, projected by `fc` and normed
(`hidden_norm`). Every draft layer attends, without a causal mask, over the context's keys
and values (that layer's K/V projections of the projected context) followed by the block's
own; the logits at the k mask positions are the draft.

The target computes those hidden states anyway, in the step that feeds the tokens: the
runner captures them (StepBatch.capture), the scheduler hands each row's slice to its
drafter (`observe`), and the drafter keeps the projected K/V of every position whose token is
committed, in buffers of whole units (DFlashDrafter). Positions whose token was a rejected
draft token are dropped when the next draft is made (`propose`): their hidden states came from
the wrong token. A draft always runs the whole block the draft was trained on; the scheduler
keeps as many of its tokens as it verifies.

A position the target never computed (a prompt prefix taken from the prefix cache) has no
features. So the contexts of finished requests are kept for a while (DraftContexts): a request
that starts as one of them did (a chat's next turn) takes over its context for the positions
they share. Where none is found the draft attends over the positions it has: that costs draft
quality, never correctness, since every draft is verified by the target.
"""

from __future__ import annotations

import json
from bisect import bisect_left
from collections import OrderedDict
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.rope_utils import initialize_rope

from ..cache import chunk_attention
from ..models.compiled import compiled
from ..prefix_cache import common_prefix_length


@dataclass
class DFlashConfig:
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    target_layer_ids: tuple[int, ...]
    mask_token_id: int
    block_size: int = 16
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1_000_000.0
    rope_scaling: dict | None = None
    max_position_embeddings: int = 40960
    attention_bias: bool = False
    # Per layer: the keys a query sees reach back at most `sliding_window` positions
    # ("sliding_attention"), or all of them ("full_attention").
    layer_types: tuple[str, ...] = field(default_factory=tuple)
    sliding_window: int | None = None

    @classmethod
    def from_config(cls, config: dict) -> "DFlashConfig":
        """From a draft checkpoint's config.json (z-lab's layout: the DFlash settings under
        `dflash_config`, some at the top level in older checkpoints; RoPE settings at the top
        level or, from transformers 5, under `rope_parameters`). Raises ValueError saying
        what is wrong."""
        if not isinstance(config, dict):
            raise ValueError("DFlash draft: its config.json is not a JSON object")
        extra = config.get("dflash_config") or {}
        if not isinstance(extra, dict):
            raise ValueError("DFlash draft: dflash_config in its config.json is not a JSON object")

        def setting(key, default=None):
            return extra.get(key, config.get(key, default))

        ids, mask = setting("target_layer_ids"), setting("mask_token_id")
        if ids is None or mask is None:
            raise ValueError("not a DFlash draft: its config.json names no target_layer_ids and mask_token_id "
                             "(under dflash_config)")
        if not isinstance(ids, list) or not ids or not all(_is_int(i) for i in ids):
            raise ValueError(f"DFlash draft: target_layer_ids must be a non-empty list of layer numbers, got {ids!r}")
        if not _is_int(mask):
            raise ValueError(f"DFlash draft: mask_token_id must be a token id, got {mask!r}")
        sizes = {key: config.get(key) for key in ("hidden_size", "num_hidden_layers", "num_attention_heads",
                                                    "intermediate_size", "vocab_size")}
        heads = sizes["num_attention_heads"]
        sizes["num_key_value_heads"] = config.get("num_key_value_heads", heads)
        sizes["block_size"] = setting("block_size", 16)
        hidden = sizes["hidden_size"]
        sizes["head_dim"] = config.get("head_dim") or (hidden // heads if _is_int(hidden) and _is_int(heads) and heads > 0
                                                       else None)
        for key, value in sizes.items():
            if not _is_int(value) or value <= 0:
                raise ValueError(f"DFlash draft: {key} in its config.json must be a positive whole number, got {value!r}")
        if sizes["block_size"] < 2:  # (1 was taken: the draft then ran its k tokens as a block it never saw)
            raise ValueError("DFlash draft: block_size in its config.json must be at least 2 (a block is the newest "
                             f"token and the tokens drafted after it: 1 leaves none to draft), "
                             f"got {sizes['block_size']}")
        layers = sizes["num_hidden_layers"]
        layer_types = config.get("layer_types") or ["full_attention"] * layers
        if (not isinstance(layer_types, list) or len(layer_types) != layers
                or set(layer_types) - {"full_attention", "sliding_attention"}):
            raise ValueError(f"DFlash draft: layer_types must be {layers} of full_attention/sliding_attention, "
                             f"got {layer_types!r}")
        window = config.get("sliding_window")
        if "sliding_attention" in layer_types and not (_is_int(window) and window > 0):
            raise ValueError("DFlash draft: sliding_attention layers need a sliding_window")
        rope = config.get("rope_parameters") or {}
        theta = config.get("rope_theta", rope.get("rope_theta", 1_000_000.0))
        scaling = config.get("rope_scaling")
        if scaling is None and rope.get("rope_type", "default") != "default":
            scaling = rope
        return cls(
            **sizes,
            target_layer_ids=tuple(int(i) for i in ids),
            mask_token_id=int(mask),
            rms_norm_eps=float(config.get("rms_norm_eps", 1e-6)),
            rope_theta=float(theta),
            rope_scaling=scaling,
            max_position_embeddings=int(config.get("max_position_embeddings") or 40960),
            attention_bias=bool(config.get("attention_bias", False)),
            layer_types=tuple(layer_types),
            sliding_window=window if "sliding_attention" in layer_types else None,
        )


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


# Context positions a step adds that are projected by a compiled function: a verifying step's
# accepted tokens (at most MAX_DRAFT_TOKENS + 1), not a prompt chunk's.
COMPILED_CONTEXT_POSITIONS = 32


def default_target_layer_ids(target_layers: int, draft_layers: int) -> tuple[int, ...]:
    """Target layers whose outputs a draft of `draft_layers` layers reads, spread from layer 1
    to the fourth-last: the choice of z-lab's training code, for random drafts."""
    if draft_layers == 1:
        return (target_layers // 2,)
    start, end = 1, target_layers - 3
    return tuple(int(round(start + i * (end - start) / (draft_layers - 1))) for i in range(draft_layers))


class DraftAttention(nn.Module):
    def __init__(self, config: DFlashConfig):
        super().__init__()
        dim, d = config.hidden_size, config.head_dim
        self.n_heads, self.n_kv_heads, self.head_dim = config.num_attention_heads, config.num_key_value_heads, d
        self.scale = d**-0.5
        bias = config.attention_bias
        self.q_proj = nn.Linear(dim, self.n_heads * d, bias=bias)
        self.k_proj = nn.Linear(dim, self.n_kv_heads * d, bias=bias)
        self.v_proj = nn.Linear(dim, self.n_kv_heads * d, bias=bias)
        self.o_proj = nn.Linear(self.n_heads * d, dim, bias=bias)
        self.q_norm = nn.RMSNorm(d, eps=config.rms_norm_eps)
        self.k_norm = nn.RMSNorm(d, eps=config.rms_norm_eps)

    def keys_values(self, x: mx.array, rope, starts) -> tuple[mx.array, mx.array]:
        """Keys and values [rows, kv heads, n, head_dim] of x [rows, n, hidden], row i's at
        positions starts[i].. (`starts`: an int for one row, or an array)."""
        rows, n, _ = x.shape
        k = self.k_norm(self.k_proj(x).reshape(rows, n, self.n_kv_heads, -1)).transpose(0, 2, 1, 3)
        v = self.v_proj(x).reshape(rows, n, self.n_kv_heads, -1).transpose(0, 2, 1, 3)
        return rope(k, offset=starts), v

    def project(self, x: mx.array, rope, starts: mx.array) -> tuple[mx.array, mx.array, mx.array]:
        """Queries [rows, n, heads, head_dim], and keys_values, of the blocks x [rows, n,
        hidden]."""
        rows, n, _ = x.shape
        q = self.q_norm(self.q_proj(x).reshape(rows, n, self.n_heads, -1)).transpose(0, 2, 1, 3)
        return (rope(q, offset=starts).transpose(0, 2, 1, 3), *self.keys_values(x, rope, starts))


class DraftMLP(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden, bias=False)
        self.up_proj = nn.Linear(dim, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, dim, bias=False)

    def __call__(self, x: mx.array) -> mx.array:
        return self.down_proj(nn.silu(self.gate_proj(x)) * self.up_proj(x))


class DraftLayer(nn.Module):
    def __init__(self, config: DFlashConfig, index: int, sliding: bool):
        super().__init__()
        self.self_attn = DraftAttention(config)
        self.mlp = DraftMLP(config.hidden_size, config.intermediate_size)
        self.input_layernorm = nn.RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = nn.RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.index = index  # its keys and values in a drafter's context buffers
        self.window = config.sliding_window if sliding else None

    def step(self, rope, x: mx.array, keys: mx.array, values: mx.array, key_positions: mx.array,
             lengths: mx.array, starts: mx.array) -> mx.array:
        """The layer over the blocks x [rows, n, hidden], row i's at positions starts[i]..:
        attention, with no causal mask, over the first lengths[i] context entries of row i's
        buffers (keys, values [rows, layers, kv heads, capacity, head_dim]; key_positions
        [rows, capacity]), then the block's own keys, and the MLP. Run compiled: its shapes
        change only with the rows and the capacity."""
        attn = self.self_attn
        rows, n, _ = x.shape
        capacity = keys.shape[3]
        q, k, v = attn.project(self.input_layernorm(x), rope, starts)
        keys = mx.concatenate([keys[:, self.index], k], axis=2)
        values = mx.concatenate([values[:, self.index], v], axis=2)
        visible = (mx.arange(capacity)[None, :] < lengths[:, None])[:, None, :]  # [rows, 1, capacity]
        if self.window is not None:
            queries = starts[:, None] + mx.arange(n)[None, :]
            visible = visible & (key_positions[:, None, :] > queries[:, :, None] - self.window)
        visible = mx.concatenate([mx.broadcast_to(visible, (rows, n, capacity)), mx.ones((rows, n, n), dtype=mx.bool_)],
                                 axis=2)
        mask = mx.where(visible, mx.array(0.0, x.dtype), mx.array(-float("inf"), x.dtype))[:, None]
        out = chunk_attention(q, keys, values, mask, attn.scale).reshape(rows, n, -1)
        h = x + attn.o_proj(out)
        return h + self.mlp(self.post_attention_layernorm(h))


class DFlashDraft(nn.Module):
    """The draft's own weights; `bind` lends it the target's embedding and LM head."""

    def __init__(self, config: DFlashConfig):
        super().__init__()
        self.config = config
        self.fc = nn.Linear(len(config.target_layer_ids) * config.hidden_size, config.hidden_size, bias=False)
        self.hidden_norm = nn.RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.layers = [DraftLayer(config, i, kind == "sliding_attention") for i, kind in enumerate(config.layer_types)]
        self.norm = nn.RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        # Not parameters (set through object.__setattr__): the target's, see bind.
        object.__setattr__(self, "_rope", initialize_rope(config.head_dim, config.rope_theta, False,
                                                          config.rope_scaling, config.max_position_embeddings))
        object.__setattr__(self, "_embed", None)
        object.__setattr__(self, "_head", None)

    @property
    def target_layer_ids(self) -> tuple[int, ...]:
        return self.config.target_layer_ids

    @property
    def block_size(self) -> int:
        return self.config.block_size

    @property
    def dtype(self) -> mx.Dtype:
        return self.norm.weight.dtype

    def bind(self, target: nn.Module) -> "DFlashDraft":
        """Use the target's token embedding and LM head (the draft has neither), after
        checking that the two fit together."""
        self.check_fits(target)
        embed = target.model.embed_tokens
        object.__setattr__(self, "_embed", embed)
        object.__setattr__(self, "_head", embed.as_linear if target.args.tie_word_embeddings else target.lm_head)
        return self

    def check_fits(self, target: nn.Module) -> None:
        """Raise ValueError unless the draft was made for a model of the target's shape."""
        args, config = target.args, self.config
        layers = len(target.model.layers)
        if config.hidden_size != args.hidden_size:
            raise ValueError(f"DFlash draft: its hidden size {config.hidden_size} is not the target's "
                             f"{args.hidden_size}: it was trained for another model")
        bad = [i for i in config.target_layer_ids if not 0 <= i < layers - 1]
        if bad:
            raise ValueError(f"DFlash draft: it reads target layers {list(config.target_layer_ids)}, but the target "
                             f"has {layers} (the last one's output cannot be read): it was trained for another model")
        if config.vocab_size != args.vocab_size:  # (it borrows the target's embedding and head)
            raise ValueError(f"DFlash draft: its vocabulary of {config.vocab_size} tokens is not the target's "
                             f"{args.vocab_size}: it was trained for another model")
        if not 0 <= config.mask_token_id < args.vocab_size:
            raise ValueError(f"DFlash draft: its mask token {config.mask_token_id} is outside the target's vocabulary "
                             f"of {args.vocab_size}: it was trained for another model")

    def context_bytes_per_token(self) -> int:
        """Memory a row's draft context takes per position: every layer's K and V."""
        c = self.config
        return c.num_hidden_layers * 2 * c.num_key_value_heads * c.head_dim * self.dtype.size

    def project_context(self, features: mx.array, start) -> list[tuple[mx.array, mx.array]]:
        """Per layer, the keys and values [1, kv heads, n, head_dim] of target features
        [n, layers x hidden] at positions start..start + n - 1."""
        h = self.hidden_norm(self.fc(features.astype(self.dtype)))
        return [layer.self_attn.keys_values(h[None], self._rope, start) for layer in self.layers]

    def _stacked_context(self, features: mx.array, start: mx.array) -> tuple[mx.array, mx.array]:
        """project_context's keys and values stacked over the layers: [layers, kv heads, n, head_dim]."""
        pairs = self.project_context(features, start)
        return mx.concatenate([k for k, _ in pairs]), mx.concatenate([v for _, v in pairs])

    def stacked_context(self, features: mx.array, start: int) -> tuple[mx.array, mx.array]:
        """_stacked_context; compiled for the few positions a decoding step adds (traced once
        per count), eager for a prompt chunk (whose lengths are too many to trace each)."""
        fn = self._stacked_context
        if features.shape[0] <= COMPILED_CONTEXT_POSITIONS:
            fn = compiled(self, "draft_context", fn, True)
        return fn(features, mx.array(start, dtype=mx.int32))

    def block_logits(self, drafters: list["DFlashDrafter"], anchors: list[int], positions: list[int],
                     k: int) -> mx.array:
        """Logits [rows, k, vocab] (lazy) of the k tokens to follow each row's anchor token
        (at its position), given each drafter's context, in one forward pass over every
        row's block. The drafters' buffers have one capacity (resolve_drafts groups them so):
        stacked as they are, entries past each row's length masked."""
        if len({d.capacity for d in drafters}) != 1:
            raise ValueError("block_logits: the drafters' buffers differ in capacity")
        if len(drafters) == 1:
            d = drafters[0]
            keys, values, key_positions = d.keys[None], d.values[None], d.key_positions[None]
        else:
            keys = mx.stack([d.keys for d in drafters])
            values = mx.stack([d.values for d in drafters])
            key_positions = mx.stack([d.key_positions for d in drafters])
        lengths = mx.array([d.length for d in drafters], dtype=mx.int32)
        starts = mx.array(positions, dtype=mx.int32)
        block = mx.array([[a] + [self.config.mask_token_id] * k for a in anchors])
        x = self._embed(block).astype(self.dtype)
        for layer in self.layers:
            step = compiled(layer, "draft_step", partial(layer.step, self._rope), True)
            x = step(x, keys, values, key_positions, lengths, starts)
        return compiled(self, "draft_head", self._logits, True)(x)

    def _logits(self, x: mx.array) -> mx.array:
        return self._head(self.norm(x[:, 1:]))


class DFlashDrafter:
    """One row's drafter: the keys and values of its committed positions, in every draft
    layer, and the target features still to project (see the module docstring).

    The keys and values live in buffers of which the first `length` entries count: a draft
    step's shapes change only when a buffer grows, so its compiled layers are traced once
    per capacity, and forgetting positions (a rejected draft's) is a matter of lowering
    `length`. A buffer grows as the row's KV slot does (`capacity_for`, cache.KVStore's), so
    that the share of the memory budget the engine leaves to draft contexts covers it."""

    def __init__(self, draft: DFlashDraft, capacity_for=None):
        self.draft = draft
        # entries -> buffer capacity; by default the KV's rule for 64-token blocks, unbounded
        self.capacity_for = capacity_for or _doubling_from(256)
        self.keys: mx.array | None = None  # [layers, kv heads, capacity, head_dim]
        self.values: mx.array | None = None
        self.key_positions: mx.array | None = None  # [capacity] int32: each entry's position
        self.positions: list[int] = []  # the position of each entry that counts, ascending
        self.pending: list[tuple[int, mx.array]] = []  # (first position, features [n, ...]) to project

    @property
    def length(self) -> int:
        return len(self.positions)

    @property
    def context(self) -> list[tuple[mx.array, mx.array]]:
        """Per layer, the keys and values [1, kv heads, length, head_dim] that count."""
        n = self.length
        return [(self.keys[i : i + 1, :, :n], self.values[i : i + 1, :, :n]) for i in range(len(self.draft.layers))]

    def observe(self, start: int, features: mx.array) -> None:
        """Target features [n, ...] of positions start..start + n - 1, just computed (lazily)
        by the step that fed them; whatever was known from `start` on is replaced."""
        self._truncate(start)
        self.pending.append((start, features))

    @property
    def capacity(self) -> int:
        """Entries its buffers hold (0 before any): the memory it takes, in positions."""
        return 0 if self.keys is None else self.keys.shape[2]

    def propose(self, tokens: list[int], k: int) -> "PendingDraft":
        """k greedy draft tokens to follow `tokens`, a row's sequence, whose last token is not
        fed yet: computed with the step's other drafts (resolve_drafts)."""
        self._prepare(len(tokens) - 1)
        return PendingDraft(self, tokens[-1], len(tokens) - 1, k)

    def logits(self, tokens: list[int], k: int) -> mx.array:
        """The draft's logits [k, vocab] (lazy) for the k tokens to follow `tokens` (this row
        alone)."""
        self._prepare(len(tokens) - 1)
        return self.draft.block_logits([self], [tokens[-1]], [len(tokens) - 1], _block_width(self.draft, k))[0, :k]

    def _prepare(self, anchor: int) -> None:
        """The context for a draft whose anchor token is at `anchor`: the positions before it."""
        self._truncate(anchor)  # later positions held rejected draft tokens
        self._project()
        if self.keys is None:
            self._grow(1)

    def settle(self, committed: int) -> int:
        """Project what is pending and forget positions from `committed` on; returns how
        many positions the context holds."""
        self._truncate(committed)
        self._project()
        return self.length

    def forget(self) -> None:
        """Drop the whole context and its buffers (a preempted row: its memory goes back)."""
        self.keys = self.values = self.key_positions = None
        self.positions, self.pending = [], []

    def adopt(self, other: "DFlashDrafter", end: int) -> None:
        """Take over `other`'s context for positions before `end` (its tokens there are
        this row's), in place of anything known here. (The buffers are shared: writes
        make new arrays.)"""
        keep = bisect_left(other.positions, end)
        self.keys, self.values, self.key_positions = other.keys, other.values, other.key_positions
        self.positions = other.positions[:keep]
        self.pending = []

    def _truncate(self, end: int) -> None:
        """Forget every position from `end` on."""
        self.pending = [(s, f[: end - s]) for s, f in self.pending if s < end]
        if self.positions and self.positions[-1] >= end:
            self.positions = self.positions[: bisect_left(self.positions, end)]

    def _project(self) -> None:
        for start, features in self.pending:
            n = features.shape[0]
            if n == 0:
                continue
            self._grow(self.length + n)
            keys, values = self.draft.stacked_context(features, start)
            at = mx.array([self.length])
            self.keys = mx.slice_update(self.keys, keys, at, axes=(2,))
            self.values = mx.slice_update(self.values, values, at, axes=(2,))
            self.key_positions = mx.slice_update(self.key_positions, mx.arange(start, start + n, dtype=mx.int32),
                                                 at, axes=(0,))
            self.positions += range(start, start + n)
        self.pending = []

    def _grow(self, needed: int) -> None:
        """Make the buffers hold at least `needed` entries (see capacity_for)."""
        capacity = self.capacity
        if needed <= capacity:
            return
        new = self.capacity_for(needed)
        c = self.draft.config
        more = mx.zeros((c.num_hidden_layers, c.num_key_value_heads, new - capacity, c.head_dim), self.draft.dtype)
        extra = mx.zeros((new - capacity,), mx.int32)
        if self.keys is None:
            self.keys, self.values, self.key_positions = more, more, extra
        else:
            self.keys = mx.concatenate([self.keys, more], axis=2)
            self.values = mx.concatenate([self.values, more], axis=2)
            self.key_positions = mx.concatenate([self.key_positions, extra])


def _doubling_from(first: int):
    def capacity_for(entries: int) -> int:
        capacity = first
        while capacity < entries:
            capacity *= 2
        return capacity

    return capacity_for


def _block_width(draft: DFlashDraft, k: int) -> int:
    """Mask tokens of a draft asked for k tokens: the whole block the draft was trained on,
    whatever k (its positions attend to each other, so fewer would change every logit)."""
    return max(k, draft.block_size - 1)


@dataclass
class PendingDraft:
    """A row's draft, computed with the step's others (resolve_drafts). `override`: tokens to
    propose instead of the draft's own (benchmarks and tests: the draft still runs)."""

    drafter: DFlashDrafter
    anchor: int
    position: int
    k: int
    override: list[int] | None = None

    def __len__(self) -> int:
        return self.k


def resolve_drafts(pending: list[PendingDraft]) -> list[list[int]]:
    """Every pending draft's tokens: one forward pass per draft model, block width and
    buffer capacity for all its rows (rows of one capacity are stacked as they are, so the
    step's copy of their buffers is no bigger than the buffers), one evaluation for all."""
    groups: dict[tuple, list[int]] = {}
    for i, p in enumerate(pending):
        key = (id(p.drafter.draft), _block_width(p.drafter.draft, p.k), p.drafter.capacity)
        groups.setdefault(key, []).append(i)
    tokens: list[mx.array | None] = [None] * len(pending)
    for (_, width, _), members in groups.items():
        draft = pending[members[0]].drafter.draft
        logits = draft.block_logits([pending[i].drafter for i in members], [pending[i].anchor for i in members],
                                    [pending[i].position for i in members], width)
        best = mx.argmax(logits, axis=-1)
        for row, i in enumerate(members):
            tokens[i] = best[row, : pending[i].k]
    mx.eval(tokens)
    return [p.override if p.override is not None else t.tolist() for p, t in zip(pending, tokens)]


class DraftContexts:
    """The draft contexts of recently finished requests, newest last, whose buffers hold at
    most `max_positions` entries together (the oldest go first): a request whose prompt begins
    as one of their sequences did, a chat's next turn above all, takes over the context of
    the longest such beginning (its prefix comes from the prefix cache, so the target never
    computes its features again)."""

    MAX_ENTRIES = 16  # (each admission compares its prompt with every entry)

    def __init__(self, max_positions: int):
        self.max_positions = max_positions
        self.entries: OrderedDict[int, tuple[list[int], DFlashDrafter]] = OrderedDict()
        self._held = 0
        self._next = 0

    def keep(self, tokens: list[int], drafter: DFlashDrafter, room: int) -> None:
        """Keep a finished row's context (its sequence `tokens`), within `room` entries
        (what running rows' buffers leave of max_positions)."""
        if not drafter.settle(len(tokens) - 1):  # (its last token was never fed)
            return
        self.entries[self._next] = (list(tokens), drafter)
        self._next += 1
        self._held += drafter.capacity
        self.fit(room)

    def clear(self) -> None:
        self.entries.clear()
        self._held = 0

    def fit(self, room: int) -> None:
        """Drop the oldest kept contexts until they hold at most `room` entries (what the
        running rows' buffers leave of max_positions), or MAX_ENTRIES contexts."""
        while self.entries and (self._held > min(room, self.max_positions) or len(self.entries) > self.MAX_ENTRIES):
            _, (_, old) = self.entries.popitem(last=False)
            self._held -= old.capacity

    def seed(self, drafter: DFlashDrafter, tokens: list[int]) -> int:
        """Give a new row's drafter the context of the kept sequence that shares the longest
        beginning with `tokens`; returns how many positions it got."""
        best, best_len = None, 0
        for key, (kept, _) in self.entries.items():
            n = common_prefix_length(kept, tokens)
            if n > best_len:
                best, best_len = key, n
        if best is None:
            return 0
        _, source = self.entries[best]
        self.entries.move_to_end(best)
        drafter.adopt(source, best_len)
        return len(drafter.positions)


def load_dflash_draft(path: Path, target: nn.Module, dtype: mx.Dtype) -> DFlashDraft:
    """A DFlash draft from a checkpoint folder (config.json and *.safetensors, z-lab's
    layout), in `dtype`, bound to `target`."""
    path = Path(path)
    config_file = path / "config.json"
    if not config_file.is_file():
        raise ValueError(f"DFlash draft: {path} has no config.json")
    try:
        raw = json.loads(config_file.read_text())
    except (OSError, ValueError) as exc:
        raise ValueError(f"DFlash draft: cannot read {config_file} ({exc})") from None
    config = DFlashConfig.from_config(raw)
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise ValueError(f"DFlash draft: {path} has no .safetensors weights")
    from ..loader import ModelLoadError, _load_weights_file

    weights = {}
    for file in files:
        if not file.is_file():  # (mx.load would wait on a FIFO for ever)
            raise ValueError(f"DFlash draft: {file} is not a regular file")
        try:  # (MLX's "[read] Unable to read 1 bytes from file." named no file)
            weights.update(_load_weights_file(str(file)))
        except ModelLoadError as exc:
            raise ValueError(f"DFlash draft: {exc}") from None
    draft = DFlashDraft(config)
    draft.check_fits(target)  # (before its weights: a mismatch says which model it is for)
    try:
        draft.load_weights(list(_sanitize(weights).items()), strict=True)
    except ValueError as exc:
        raise ValueError(f"DFlash draft: {path}: its weights do not match its config.json ({exc})") from None
    draft.set_dtype(dtype)
    mx.eval(draft.parameters())
    return draft.bind(target)


def _sanitize(weights: dict) -> dict:
    """The draft's own parameters: an optional `model.` prefix dropped, and the embedding or
    LM head that some checkpoints carry left out (the target's are used)."""
    out = {}
    for key, value in weights.items():
        key = key.removeprefix("model.")
        if key.startswith(("embed_tokens.", "lm_head.")) or "rotary_emb" in key:
            continue
        out[key] = value
    return out


def random_dflash_draft(target: nn.Module, dtype: mx.Dtype, layers: int = 5, seed: int = 0) -> DFlashDraft:
    """A draft with random weights at the shape z-lab trains for a target of this size (5
    layers; the target's hidden, MLP and attention sizes), for benchmarks: its drafts are
    as costly as a trained one's, and almost never right."""
    args = target.args
    target_layers = len(target.model.layers)
    # (A tiny test model has too few layers to spread five over: it gives all but its last.)
    ids = default_target_layer_ids(target_layers, layers) if target_layers >= 8 else tuple(range(max(1, target_layers - 1)))
    heads = args.num_attention_heads
    config = DFlashConfig(
        hidden_size=args.hidden_size, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=args.num_key_value_heads or heads,
        head_dim=args.head_dim or args.hidden_size // heads,
        # (a mixture-of-experts target has no dense MLP size: three times its hidden size)
        intermediate_size=args.intermediate_size or 3 * args.hidden_size, vocab_size=args.vocab_size,
        target_layer_ids=ids,
        mask_token_id=args.vocab_size - 1, rms_norm_eps=args.rms_norm_eps,
        layer_types=("full_attention",) * layers,
    )
    draft = DFlashDraft(config)
    mx.random.seed(seed)
    from mlx.utils import tree_flatten, tree_unflatten

    params = []
    for name, value in tree_flatten(draft.parameters()):
        if name.endswith("norm.weight"):
            params.append((name, mx.ones(value.shape, dtype)))
        else:
            params.append((name, (mx.random.normal(value.shape) * 0.02).astype(dtype)))
    draft.update(tree_unflatten(params))
    mx.eval(draft.parameters())
    return draft.bind(target)
