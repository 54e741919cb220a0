"""What single operations of a step cost, host and device together, at Qwen3-0.6B and
Qwen3.5-0.8B shapes (bf16): each case is built and queued (mx.async_eval) REPEAT times, then
synchronized once; printed per repeat are the time until done and the host's share (building
and queueing). Small operations are bound by the host, so this is where a step's fixed cost
per layer comes from.

    PYTHONPATH=src python3 scripts/bench_ops.py [--repeat 200]
"""

import argparse
import time

import mlx.core as mx
import mlx.nn as nn

from mlxserve.cache import chunk_attention, decode_attention
from mlxserve.models.gated_delta import gated_delta_chunked
from mlxserve.models.qwen3_5 import _depthwise_conv

DT = mx.bfloat16


def timed(name: str, fn, repeat: int, reference: mx.array | None = None) -> None:
    """Per repeat: the host's time to build and queue the case, and the time until the
    device has also finished (the larger of the two bounds a step made of such cases).
    With `reference`, also the largest difference of the case's result from it."""
    for _ in range(3):  # build kernels, traces and cuDNN graphs first
        mx.eval(fn())
    mx.synchronize()
    start = time.perf_counter()
    for _ in range(repeat):
        mx.async_eval(fn())
    queued = time.perf_counter()
    mx.synchronize()
    done = time.perf_counter()
    diff = ""
    if reference is not None:
        diff = f"  max diff {mx.abs(fn().astype(mx.float32) - reference.astype(mx.float32)).max().item():.3g}"
    print(f"{name:58s} {1e6 * (done - start) / repeat:9.1f} us  (host {1e6 * (queued - start) / repeat:7.1f} us){diff}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeat", type=int, default=200)
    r = parser.parse_args().repeat
    n, keys = 32, 640
    x = mx.random.normal((n, 1024)).astype(DT)
    w = (mx.random.normal((4096, 1024)) * 0.03).astype(DT)
    norm_w = mx.ones((1024,), DT)
    mx.eval(x, w, norm_w)
    timed(f"matmul [{n},1024] x [1024,4096]", lambda: x @ w.T, r)
    timed(f"rms_norm [{n},1024]", lambda: mx.fast.rms_norm(x, norm_w, 1e-6), r)
    timed(f"add [{n},1024]", lambda: x + x, r)
    q = mx.random.normal((n, 16, 1, 128)).astype(DT)
    pos = mx.arange(n) + 600
    mx.eval(q, pos)
    timed(f"rope [{n},16,1,128] per-row offsets", lambda: mx.fast.rope(q, 128, traditional=False, base=1e6, scale=1.0, offset=pos), r)
    shelf = mx.zeros((40, 8, 1024, 128), DT)
    rows = mx.arange(n * 8) * 1024 + 600
    new = mx.random.normal((n * 8, 128)).astype(DT)
    mx.eval(shelf, rows, new)
    state = {"shelf": shelf}

    def write():
        flat = state["shelf"].reshape(-1, 128)
        flat[rows] = new
        state["shelf"] = flat.reshape(40, 8, 1024, 128)
        return state["shelf"]

    timed("KV write: scatter 256 rows into [40,8,1024,128]", write, r)
    k = state["shelf"][:n, :, :keys]
    v = state["shelf"][:n, :, :keys]
    mask = mx.zeros((n, 1, 1, keys), DT)
    mx.eval(k, v, mask)
    timed(f"sdpa q[{n},16,1,128] k[{n},8,{keys}] no mask (vector kernel)",
          lambda: mx.fast.scaled_dot_product_attention(q, k, v, scale=0.088), r)
    timed(f"sdpa same, additive mask [{n},1,1,{keys}] (fallback)",
          lambda: mx.fast.scaled_dot_product_attention(q, k, v, scale=0.088, mask=mask), r)
    q3 = q.reshape(n, 16, 128)
    timed("same, mlxserve's decode_attention (cache.py)", lambda: decode_attention(q3, k, v, mask, 0.088), r)
    # A prefill chunk of t tokens over L keys (a slot's keys, the tail masked), Qwen3-0.6B heads
    for t, length in ((96, 8192), (128, 16384), (512, 4096), (512, 8192), (512, 16384)):
        qc = mx.random.normal((1, t, 16, 128)).astype(DT)
        kc = mx.random.normal((1, 8, length, 128)).astype(DT)
        visible = mx.arange(length)[None, None, None, :] <= (length - t - 100 + mx.arange(t))[None, None, :, None]
        maskc = mx.where(visible, mx.array(0.0, DT), mx.array(-float("inf"), DT))
        mx.eval(qc, kc, maskc)
        timed(f"chunk t={t} keys={length}: sdpa with array mask",
              lambda: mx.fast.scaled_dot_product_attention(qc.transpose(0, 2, 1, 3), kc, kc, scale=0.088, mask=maskc), r // 4)
        timed(f"chunk t={t} keys={length}: mlxserve's chunk_attention",
              lambda: chunk_attention(qc, kc, kc, maskc, 0.088), r // 4)
        exact = kc[:, :, : length - 100]  # a single row's exact keys: causal, no mask array
        mx.eval(exact)
        timed(f"chunk t={t} keys={length - 100}: sdpa causal (exact keys)",
              lambda: mx.fast.scaled_dot_product_attention(qc.transpose(0, 2, 1, 3), exact, exact, scale=0.088,
                                                           mask="causal"), r // 4)
    # Qwen3.5-0.8B linear attention: conv over 6144 channels, 16 heads of 128x128 state
    conv = nn.Conv1d(6144, 6144, 4, groups=6144, bias=False)
    conv.weight = conv.weight.astype(DT)
    for t in (1, 448):
        window = mx.random.normal((n if t == 1 else 1, t + 3, 6144))
        mx.eval(window, conv.parameters())
        timed(f"conv1d depthwise nn.Conv1d, window [{window.shape[0]},{t + 3},6144]", lambda: conv(window), r)
        fused = mx.compile(lambda a, b: _depthwise_conv(a, b, t))
        timed(f"conv1d depthwise as 4 shifted multiply-adds, compiled, t={t}", lambda: fused(window, conv.weight), r)
    T = 448
    qk = mx.random.normal((1, T, 16, 128)).astype(DT) * 0.05
    vv = mx.random.normal((1, T, 16, 128)).astype(DT)
    g = mx.random.uniform(0.9, 1.0, (1, T, 16))
    beta = mx.random.uniform(0.0, 1.0, (1, T, 16))
    s0 = mx.zeros((1, 16, 128, 128))
    mx.eval(qk, vv, g, beta, s0)
    timed(f"gated delta chunked T={T}, eager", lambda: gated_delta_chunked(qk, qk, vv, g, beta, s0), r // 4)
    compiled_delta = mx.compile(gated_delta_chunked)
    timed(f"gated delta chunked T={T}, compiled", lambda: compiled_delta(qk, qk, vv, g, beta, s0), r // 4)
    # A prompt's last chunk has a length not seen before: what its first compiled call costs
    # (a new trace, and on a GPU perhaps new kernels) against one eager call.
    for T in (37, 101, 229):
        args = (qk[:, :T], qk[:, :T], vv[:, :T], g[:, :T], beta[:, :T], s0)
        mx.eval(*args)
        start = time.perf_counter()
        mx.eval(compiled_delta(*args))
        first = time.perf_counter() - start
        start = time.perf_counter()
        mx.eval(gated_delta_chunked(*args))
        eager = time.perf_counter() - start
        print(f"{'gated delta T=' + str(T) + ': first compiled call / one eager call':58s} {1e6 * first:9.1f} / {1e6 * eager:.1f} us")


if __name__ == "__main__":
    main()
