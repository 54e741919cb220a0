"""The gated delta rule, the recurrence of Qwen3.5's linear-attention layers.

Per value head, with state S [Dv, Dk], decay g_t in (0, 1] and update rate beta_t:
    S_t = g_t S_{t-1} + beta_t (v_t - g_t S_{t-1} k_t) k_t^T,      o_t = S_t q_t
(q and k already L2-normalised. The reference's q also carries the 1/sqrt(Dk) read-out
scale; Qwen3.5's layers leave it out and let their output norm absorb it, see qwen3_5.py.
Nothing here depends on it: the outputs are linear in q, the state does not read it.)

`gated_delta(...)` picks one of two forms:
  - MLX's own `mx.fast.gated_delta_update` (when the installed MLX has it), which walks the
    tokens in order: for a token or a few per row;
  - `gated_delta_chunked`, a pure-MLX formulation that processes CHUNK tokens at a time with
    matrix products (the "WY" form of the delta rule): for prompts. On an H200 (MLX 0.32.4
    CUDA, one Qwen3.5-0.8B layer: 16 heads, 128x128 state, bf16; figures in the Qwen3.5
    issue's notes) it prefilled 4096 tokens in 36 ms against the fast op's 426 ms, while
    one decode token took 0.52 ms against 0.15 ms.
A third, `gated_delta_step`, is one token per row written so that inside a compiled function
(models/compiled.py) it is a few kernels: Qwen3.5 decodes through it where the fast op is not
a kernel of its own (`native_fast_op`). On Metal it is one; on MLX's CPU and CUDA back-ends it
is a composition of generic operations (on an H200 a Qwen3.5-0.8B single-stream decode step
launched 647 kernels with it, 521 with the step and the decode path's other changes in
models/qwen3_5.py; `scripts/kernel_census.py`).
All take and return float32 state, and none is a per-token Python loop.
"""

from __future__ import annotations

import mlx.core as mx

CHUNK = 64
# Up to this many tokens per row the sequential fast op wins (decode, short drafts); above it
# the chunked form does (measured, see above).
FAST_MAX_TOKENS = 4


def native_fast_op() -> bool:
    """Whether `mx.fast.gated_delta_update` is a kernel of its own on the default device (Metal)
    rather than MLX's generic fallback (CPU, CUDA)."""
    return (hasattr(mx.fast, "gated_delta_update") and mx.default_device() == mx.gpu
            and mx.metal.is_available())


def gated_delta(q, k, v, g, beta, state, *, use_fast: bool = True):
    """q, k [B, T, Hk, Dk]; v [B, T, Hv, Dv]; g, beta [B, T, Hv]; state [B, Hv, Dv, Dk] float32.
    Returns (outputs [B, T, Hv, Dv] in v's dtype, new state [B, Hv, Dv, Dk] float32)."""
    if use_fast and q.shape[1] <= FAST_MAX_TOKENS and hasattr(mx.fast, "gated_delta_update"):
        out, new_state = mx.fast.gated_delta_update(q, k, v, g, beta, state)
        return out.astype(v.dtype), new_state
    return gated_delta_chunked(q, k, v, g, beta, state)


def gated_delta_step(qk, v, g, beta, state):
    """One token per row: qk [B, 2 Hk, Dk] (q's heads, then k's); v, g, beta of B * Hv * Dv,
    B * Hv and B * Hv elements in row, head order (any shape: [B, Hk, Hv // Hk, 1, 1] for g
    and beta is used as is); state [B, Hv, Dv, Dk] float32. Returns (outputs [B, Hv, Dv], new
    state), both float32.

    The reference's arithmetic, arranged for MLX's compiler: the two state-vector products
    are matrix-vector products (one kernel each), and the rest is one fused elementwise
    kernel, as g and beta come in their broadcast shapes (a reshape between elementwise
    operations stops their fusion; given in those shapes, their own computation fuses in
    too). The update is written g (S - beta (S k) k^T) + beta v k^T, the same sum as the
    reference's g S + beta (v - g S k) k^T: there g's own computation sits deeper below the
    new state than the 11 operations MLX fuses into one kernel, and its first operation
    (Qwen3.5's a + dt_bias) took a kernel of its own. Value heads sharing a key head see it
    through broadcasting, not copies. Every array is reshaped from its input directly, q and
    k taken from one reshape of qk: each reshape or slice is a node of the compiled step that
    the host replays at every call."""
    B, Hv, Dv, Dk = state.shape
    Hk = qk.shape[1] // 2
    r = Hv // Hk  # value head j reads key head j // r
    f32 = mx.float32
    qk = qk.astype(f32)
    columns = qk.reshape(B, 2 * Hk, Dk, 1)
    q, k = columns[:, :Hk], columns[:, Hk:]
    k_row = qk.reshape(B, 2 * Hk, 1, 1, Dk)[:, Hk:]
    g = g.reshape(B, Hk, r, 1, 1).astype(f32)
    beta = beta.reshape(B, Hk, r, 1, 1).astype(f32)
    kv_mem = (state.reshape(B, Hk, r * Dv, Dk) @ k).reshape(B, Hk, r, Dv, 1)  # S k, undecayed
    v = v.reshape(B, Hk, r, Dv, 1).astype(f32)
    s = (state.reshape(B, Hk, r, Dv, Dk) - (beta * kv_mem) * k_row) * g + (beta * v) * k_row
    out = s.reshape(B, Hk, r * Dv, Dk) @ q
    return out.reshape(B, Hv, Dv), s.reshape(B, Hv, Dv, Dk)


def gated_delta_chunked(q, k, v, g, beta, state):
    """The same recurrence, CHUNK tokens at a time, in float32.

    Within a chunk starting from state S0, with G_i the product of decays up to token i:
      deltas D (one row per token) solve  D_i + beta_i sum_{j<i} (G_i/G_j)(k_i.k_j) D_j
                                              = beta_i (v_i - G_i S0 k_i)
      outputs   o_i = G_i S0 q_i + sum_{j<=i} (G_i/G_j)(q_i.k_j) D_j
      end state S   = G_C S0 + sum_j (G_C/G_j) D_j k_j^T
    The system is linear in S0, so D = U - W S0^T with U = (I+L)^-1 (beta v) and
    W = (I+L)^-1 (beta G k) independent of the state: everything but the chunk-to-chunk
    state hand-over is computed for all chunks at once, and the sequential part is two
    matrix products per chunk. The unit lower-triangular system is inverted by recursive
    block inversion (_unit_lower_solve): only matrix products.
    """
    B, T, Hk, _ = q.shape
    Hv, Dv = v.shape[2], v.shape[3]
    out_dtype = v.dtype
    if Hv != Hk:  # value head j reads key head j // (Hv / Hk)
        q = mx.repeat(q, Hv // Hk, axis=2)
        k = mx.repeat(k, Hv // Hk, axis=2)
    # [B, H, T, ...] float32
    q, k, v = (x.astype(mx.float32).transpose(0, 2, 1, 3) for x in (q, k, v))
    log_g = mx.log(g.astype(mx.float32)).transpose(0, 2, 1)
    beta = beta.astype(mx.float32).transpose(0, 2, 1)
    pad = -T % CHUNK
    if pad:  # padding tokens: no decay (log 1 = 0), no update (beta = 0, k = v = 0)
        q, k, v = (mx.pad(x, [(0, 0), (0, 0), (0, pad), (0, 0)]) for x in (q, k, v))
        log_g, beta = (mx.pad(x, [(0, 0), (0, 0), (0, pad)]) for x in (log_g, beta))
    n, C = (T + pad) // CHUNK, CHUNK
    q, k, v = (x.reshape(B, Hv, n, C, -1) for x in (q, k, v))
    log_g, beta = (x.reshape(B, Hv, n, C) for x in (log_g, beta))

    cum = mx.cumsum(log_g, axis=-1)  # log G_i  [B, H, n, C]
    rel = cum[..., :, None] - cum[..., None, :]  # log(G_i / G_j)
    strictly_lower = mx.tril(mx.ones((C, C), dtype=mx.bool_), k=-1)
    lower = mx.tril(mx.ones((C, C), dtype=mx.bool_))
    # exp only where j <= i (elsewhere rel > 0 could overflow)
    decay = mx.where(lower, mx.exp(mx.where(lower, rel, 0.0)), 0.0)
    G = mx.exp(cum)[..., None]  # [B, H, n, C, 1]
    b = beta[..., None]
    L = mx.where(strictly_lower, decay * (k @ k.swapaxes(-1, -2)), 0.0) * b
    UW = _unit_lower_solve(L, mx.concatenate([b * v, b * G * k], axis=-1))
    U, W = UW[..., :Dv], UW[..., Dv:]
    k_tail = mx.exp(cum[..., -1:, None] - cum[..., :, None]) * k  # (G_C / G_j) k_j
    chunk_decay = mx.exp(cum[..., -1])[..., None, None]  # G_C  [B, H, n, 1, 1]

    starts = []
    S = state
    for c in range(n):
        starts.append(S)
        D = U[:, :, c] - W[:, :, c] @ S.swapaxes(-1, -2)
        S = chunk_decay[:, :, c] * S + D.swapaxes(-1, -2) @ k_tail[:, :, c]
    S0 = mx.stack(starts, axis=2).swapaxes(-1, -2)  # each chunk's start state, transposed
    D = U - W @ S0
    out = (G * q) @ S0 + (decay * (q @ k.swapaxes(-1, -2))) @ D  # [B, H, n, C, Dv]
    out = out.reshape(B, Hv, n * C, Dv)[:, :, :T]
    return out.transpose(0, 2, 1, 3).astype(out_dtype), S


def _unit_lower_solve(L, rhs):
    """x with (I + L) x = rhs for strictly lower-triangular L [..., C, C], C a power of two.

    (I + L)^-1 is built by recursive 2x2 block inversion, all blocks of a level at once:
    [[A, 0], [X, B]]^-1 = [[A^-1, 0], [-B^-1 X A^-1, B^-1]], from 1x1 blocks (whose inverse
    is 1) up to C x C. Every intermediate is a block of the true inverse. (The Neumann
    product (I - L)(I + L^2)(I + L^4)... is as exact on paper, but its partial products
    cancel hugely when L is of order one: a run of identical keys (a repeated token) gave
    outputs off by 1e9 in float32.)
    """
    C = L.shape[-1]
    batch = L.shape[:-2]
    inverse = mx.ones(batch + (C, 1, 1), dtype=L.dtype)  # the 1x1 diagonal blocks' inverses
    size = 1
    while size < C:
        pairs = C // (2 * size)
        # X: the lower-left size x size block of each 2size x 2size diagonal block of L.
        grid = L.reshape(batch + (pairs, 2, size, pairs, 2, size))[..., :, 1, :, :, 0, :]
        X = mx.moveaxis(mx.diagonal(grid, axis1=-4, axis2=-2), -1, -3)  # [..., pairs, size, size]
        A_inv, B_inv = inverse[..., 0::2, :, :], inverse[..., 1::2, :, :]
        corner = -(B_inv @ (X @ A_inv))
        top = mx.concatenate([A_inv, mx.zeros_like(A_inv)], axis=-1)
        bottom = mx.concatenate([corner, B_inv], axis=-1)
        inverse = mx.concatenate([top, bottom], axis=-2)  # [..., pairs, 2size, 2size]
        size *= 2
    return inverse.reshape(batch + (C, C)) @ rhs


def gated_delta_reference(q, k, v, g, beta, state):
    """Token by token, for tests: the definition above, verbatim."""
    T, Hk = q.shape[1], q.shape[2]
    Hv = v.shape[2]
    if Hv != Hk:
        q = mx.repeat(q, Hv // Hk, axis=2)
        k = mx.repeat(k, Hv // Hk, axis=2)
    q, k, v, g, beta = (x.astype(mx.float32) for x in (q, k, v, g, beta))
    outs = []
    for t in range(T):
        decayed = state * g[:, t, :, None, None]
        kv_mem = (decayed * k[:, t, :, None, :]).sum(-1)
        delta = (v[:, t] - kv_mem) * beta[:, t, :, None]
        state = decayed + delta[..., None] * k[:, t, :, None, :]
        outs.append((state * q[:, t, :, None, :]).sum(-1))
    return mx.stack(outs, axis=1), state
