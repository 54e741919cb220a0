"""Per-layer pieces of a small step, run through `mx.compile`.

A decode step of a small model is bound by the host, not the device: every MLX operation
costs Python time to build and time to encode, and the device waits for them (on an H200
MLX encoded ~6 us per operation, and a Qwen3-0.6B decode step had ~60 graph nodes per
layer). A compiled function is traced once per input shape and afterwards replayed from C++,
with its chains of elementwise operations fused into single kernels. So the work between two
layers' reads of per-row state (one layer's output projection and MLP, the next one's norms,
projections and RoPE; see llama.run_layers) is one compiled piece, the K/V write joins it
when its shapes are the same at every step, and for linear attention the whole recurrence
of a group is compiled too. Only the attention reads, whose key lengths change every step,
and the rest of the cache bookkeeping stay eager.

Every step runs this way. Small steps (rows feeding at most MAX_TOKENS_PER_ROW tokens each:
decoding; later, verifying a few draft tokens) run at their own size. A step with a prefill
chunk has a different number of tokens almost every time, and each new shape costs a new
trace and, on a GPU, newly built kernels (a hybrid model's mixed steps took 300 ms instead of
15 on an H200 when they ran compiled at their exact sizes). So such a step's flat tokens are
padded to a multiple of MULTI_TOKEN_BUCKET (batch.build_batch): steps of at most 2,048 tokens
(scheduler.GPU_MAX_BATCH_TOKENS) make at most 32 sizes. (A lone prompt's first use of a size
cost about 50 ms on an H100, most of it for its attention's new shape, which padding to fewer
sizes does not avoid: docs/performance-history.md, session 36.) The padding tokens are
computed and thrown away: at most MULTI_TOKEN_BUCKET - 1 token rows of matrix products, next
to a step that spent several times that much of its host time building and encoding eager
operations. That holds on a GPU; on MLX's CPU back-end the arithmetic is the cost, so there
such steps run eagerly at their own size instead (`pad_multi_token_steps`).

In a decoding step a linear-attention layer's recurrence has the same shapes at every step,
so it runs inside the piece around it, and one piece spans a hybrid model's linear layers up
to the next full-attention layer's projections (llama.run_layers): 6 calls per Qwen3.5-0.8B
step where 42 were made (24 pieces, 18 recurrences). On a 2-core x86 CPU, Qwen3.5's 24-layer
structure built a one-stream step in 2.29 ms where its mixes outside the pieces took 2.81,
and an 8-stream step in 3.93 ms against 4.33 (medians; `scripts/build_time.py tiny-qwen3.5
--layers 24 --streams 1,8 --compare-eager-mixes`).

Otherwise a linear-attention group's recurrence (`when=True`) runs compiled at its exact size: a prefill
chunk is a group of its own, or of a few rows feeding short chunks of one length
(batch.build_batch), so its shapes are its rows' number and its chunk length, and
eagerly its chunked delta rule is well over a hundred operations per layer (Qwen3.5-0.8B
steps with a ~500-token chunk spent 93 ms of host time building and encoding them on an
H200, the device idle; 85 ms compiled). A chunk length not seen before costs one trace: its
first call took ~1 ms more than an eager one (`scripts/bench_ops.py`, H200).
"""

from __future__ import annotations

import threading
from collections.abc import Callable

import mlx.core as mx

MAX_TOKENS_PER_ROW = 4
MULTI_TOKEN_BUCKET = 64

# Off: everything runs eagerly (for comparisons; the results are the same).
enabled = True
# Whether steps with a prefill chunk are padded to MULTI_TOKEN_BUCKET and run compiled. None:
# on a GPU only. MLX's CPU back-end is bound by its arithmetic, not by building and encoding
# operations, so there the padding is pure cost: an 11-token prompt of SmolLM2-135M took
# 4.07 s to its first token padded to 64 tokens and 0.73 s eagerly at its own size (2-core
# x86). True forces the GPU's way on any device (the tests run it so).
pad_multi_token_steps: bool | None = None


def multi_token_bucket() -> int | None:
    """What a step with a prefill chunk is padded to a multiple of, or None: run it eagerly."""
    pad = pad_multi_token_steps
    if pad is None:
        pad = mx.default_device() != mx.cpu
    return MULTI_TOKEN_BUCKET if enabled and pad else None


def active(when: bool) -> bool:
    """Whether a step whose StepBatch.compile is `when` runs its pieces compiled."""
    return enabled and when


def compiled(owner: object, name: str, fn: Callable, when: bool) -> Callable:
    """`fn`, compiled once per `owner` (a layer; its weights are captured as constants), if
    `when` (a StepBatch's `compile`, or True); else `fn` itself."""
    if not active(when):
        return fn
    # One compiled function per thread: MLX keeps its traces in a per-thread cache keyed by
    # the function's address, and a compiled function, when freed, forgets only the traces
    # of the last thread that called it. Shared between threads, a freed model's traces
    # (with its weights) would stay behind in another thread's cache, and be replayed for a
    # later function that happens to get the same address.
    attr = f"_compiled_{name}_{threading.get_ident()}"
    found = owner.__dict__.get(attr)
    if found is None:
        found = mx.compile(fn)
        # Not a Module attribute (which would be walked as a parameter tree).
        object.__setattr__(owner, attr, found)
    return found
