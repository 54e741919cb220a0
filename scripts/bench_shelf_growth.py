"""What doubling a K/V shelf costs the host (and the device), at Qwen3-0.6B's shape with
16k-token slots (28 layers of [2, slots, 8, 16384, 128] bf16, 1.9 GB a slot): the shelf's own
growth (cache.KVStore.acquire of a second slot), against copying layer by layer with a wait
after each, with none, and in one evaluation. Peak memory shows what each holds at once.
A shelf grows while streams decode (a new long prompt when the prefix cache keeps the last
one's slot), so its host time is a pause for all of them. The last variant is how a request
being admitted grows it (`may_wait`): a GiB of new arrays per call (cache.GROWTH_BYTES_PER_STEP),
each call's host time listed.

    PYTHONPATH=src python3 scripts/bench_shelf_growth.py
"""

import time

import mlx.core as mx

from mlxserve.cache import GrowthPending, KVStore

LAYERS, SHAPE = 28, (2, 1, 8, 16384, 128)


def synced() -> float:
    mx.synchronize()
    return time.perf_counter()


def main() -> None:
    _, _, heads, tokens, head_dim = SHAPE
    for variant in ("wait after each layer", "queued, no wait", "one evaluation", "KVStore.acquire"):
        mx.reset_peak_memory()
        if variant == "KVStore.acquire":
            store = KVStore(LAYERS, heads, head_dim, mx.bfloat16)
            store.acquire(object(), tokens)  # the first slot
            start = synced()
            store.acquire(object(), tokens)  # the second: the shelf doubles
        else:
            kv = [mx.zeros(SHAPE, mx.bfloat16) for _ in range(LAYERS)]
            pad = mx.zeros(SHAPE, mx.bfloat16)
            mx.eval(kv, pad)
            start = synced()
            if variant == "one evaluation":
                kv = [mx.concatenate([a, pad], axis=1) for a in kv]
                mx.eval(kv)
            else:
                for i in range(LAYERS):
                    kv[i] = mx.concatenate([kv[i], pad], axis=1)
                    (mx.eval if variant == "wait after each layer" else mx.async_eval)(kv[i])
        host = time.perf_counter() - start
        done = synced() - start
        print(f"{variant:24s} host {1e3 * host:7.2f} ms, until done {1e3 * done:7.2f} ms, "
              f"peak {mx.get_peak_memory() / 1e9:.2f} GB")
    store = KVStore(LAYERS, heads, head_dim, mx.bfloat16)
    store.acquire(object(), tokens)
    mx.synchronize()
    calls = []
    while True:
        start = time.perf_counter()
        try:
            store.acquire(object(), tokens, may_wait=True)
            calls.append(time.perf_counter() - start)
            break
        except GrowthPending:
            calls.append(time.perf_counter() - start)
    print(f"{'KVStore.acquire, may_wait':24s} host per call " + ", ".join(f"{1e3 * t:.2f}" for t in calls) + " ms")


if __name__ == "__main__":
    main()
