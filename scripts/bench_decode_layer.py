"""Where the device time of a many-row decoding step goes: each operation of a Qwen3 decoder
layer at a real shape (default Qwen3-4B, 32 decoding rows over 640 keys, bf16), run for a
model's worth of layers (each with its own weights, as in a step), queued and then
synchronized. Printed per operation and layer: the time until the device is done and the
host's share (building and queueing). Where the first is well above the second, the device
is what that operation costs; their sum over a layer, times the layers, is a step's device
time to set against `scripts/profile_device_time.py`.

    PYTHONPATH=src python3 scripts/bench_decode_layer.py [--rows 32] [--keys 640] [--layers 36]
        [--hidden 2560] [--heads 32] [--kv-heads 8] [--head-dim 128] [--intermediate 9728]
        [--capacity 1024] [--vocab 151936]
"""

import argparse
import time

import mlx.core as mx

from mlxserve.cache import decode_attention, scatter_kv
from mlxserve.models.llama import swiglu

DT = mx.bfloat16


def timed(name: str, fn, layers: int, repeat: int = 5) -> float:
    """fn(layer) for every layer, queued then synchronized; prints and returns the median
    time until done per layer (us)."""
    done, host = [], []
    for rep in range(repeat + 2):
        mx.synchronize()
        start = time.perf_counter()
        mx.async_eval([fn(i) for i in range(layers)])
        queued = time.perf_counter()
        mx.synchronize()
        if rep >= 2:  # (kernels built, buffers allocated)
            done.append(time.perf_counter() - start)
            host.append(queued - start)
    per_layer = 1e6 * sorted(done)[len(done) // 2] / layers
    print(f"{name:64s} {per_layer:8.1f} us  (host {1e6 * sorted(host)[len(host) // 2] / layers:7.1f} us)")
    return per_layer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for name, default in (("rows", 32), ("keys", 640), ("layers", 36), ("hidden", 2560), ("heads", 32),
                          ("kv-heads", 8), ("head-dim", 128), ("intermediate", 9728), ("capacity", 1024),
                          ("vocab", 151936)):
        parser.add_argument(f"--{name}", type=int, default=default)
    a = parser.parse_args()
    n, d, layers = a.rows, a.head_dim, a.layers
    qkv_out = (a.heads + 2 * a.kv_heads) * d

    def weights(rows: int, cols: int, count: int = layers) -> list[mx.array]:
        out = [(mx.random.normal((rows, cols)) * 0.02).astype(DT) for _ in range(count)]
        mx.eval(out)
        return out

    x = mx.random.normal((n, a.hidden)).astype(DT)
    norm = mx.ones((a.hidden,), DT)
    w_qkv, w_o = weights(qkv_out, a.hidden), weights(a.hidden, a.heads * d)
    w_gate_up, w_down = weights(2 * a.intermediate, a.hidden), weights(a.hidden, a.intermediate)
    attn_out = mx.random.normal((n, a.heads * d)).astype(DT)
    act = mx.random.normal((n, a.intermediate)).astype(DT)
    gate_up = mx.random.normal((n, 2 * a.intermediate)).astype(DT)
    mx.eval(x, norm, attn_out, act, gate_up)
    total = 0.0
    total += 2 * timed(f"rms_norm [{n},{a.hidden}] (twice a layer)", lambda i: mx.fast.rms_norm(x, norm, 1e-6), layers)
    total += timed(f"qkv product [{n},{a.hidden}] x [{a.hidden},{qkv_out}]", lambda i: x @ w_qkv[i].T, layers)
    qkv = mx.random.normal((n, a.heads + 2 * a.kv_heads, d)).astype(DT)
    mx.eval(qkv)
    rope = mx.compile(lambda t: (t * 1.01 + t[:, :, ::-1] * 0.99).astype(DT))
    total += timed("norm-and-RoPE pass (an elementwise stand-in)", lambda i: rope(qkv), layers)
    shelves = [mx.zeros((2, n, a.kv_heads, a.capacity, d), DT) for _ in range(layers)]
    mx.eval(shelves)
    slots = mx.arange(n)[:, None]
    heads = mx.arange(a.kv_heads)[None, :]
    rows = (slots * a.kv_heads + heads) * a.capacity + a.keys - 1
    rows = mx.concatenate([rows, rows + n * a.kv_heads * a.capacity], axis=1).astype(mx.int32)
    kv = mx.random.normal((n, 2 * a.kv_heads, d)).astype(DT)
    mx.eval(rows, kv)

    def write(i):
        shelves[i] = scatter_kv(shelves[i], kv, rows)
        return shelves[i]

    total += timed(f"K/V scatter of {n} rows into a [2,{n},{a.kv_heads},{a.capacity},{d}] shelf", write, layers)
    q = mx.random.normal((n, a.heads, d)).astype(DT)
    mask = mx.zeros((n, 1, 1, a.keys), DT)
    mx.eval(q, mask)
    total += timed(f"decode_attention, {n} rows over {a.keys} keys",
                   lambda i: decode_attention(q, shelves[i][0, :, :, :a.keys], shelves[i][1, :, :, :a.keys], mask,
                                              d ** -0.5), layers)
    total += timed(f"o_proj addmm [{n},{a.heads * d}] x [{a.heads * d},{a.hidden}] + residual",
                   lambda i: mx.addmm(x, attn_out, w_o[i].T), layers)
    total += timed(f"gate_up product [{n},{a.hidden}] x [{a.hidden},{2 * a.intermediate}]",
                   lambda i: x @ w_gate_up[i].T, layers)
    gate, up = mx.split(gate_up, 2, axis=-1)
    total += timed(f"swiglu [{n},{a.intermediate}]", lambda i: swiglu(gate, up), layers)
    total += timed(f"down addmm [{n},{a.intermediate}] x [{a.intermediate},{a.hidden}] + residual",
                   lambda i: mx.addmm(x, act, w_down[i].T), layers)
    print(f"{'sum per layer':64s} {total:8.1f} us;  x {layers} layers: {total * layers / 1e3:.2f} ms")
    (head,) = weights(a.vocab, a.hidden, 1)
    timed(f"once a step: head product [{n},{a.hidden}] x [{a.hidden},{a.vocab}]", lambda i: x @ head.T, 1)


if __name__ == "__main__":
    main()
