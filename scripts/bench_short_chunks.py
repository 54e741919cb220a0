"""What one step costs whose rows each feed a few tokens over many cached keys: the tails of
prompts that share a cached beginning, `n` choices of one prompt, rows verifying drafts. Per
case (N rows x T tokens over K keys), the median of 20 steps, each built, evaluated and
waited for, on random weights at a real shape, with the attention groups the step formed
(rows, tokens per row, through cache.chunk_attention). The keys are left as allocated: what
they hold does not change the work.

Run it on two checkouts (PYTHONPATH pointing at each one's src) to compare their steps.

    PYTHONPATH=src python3 scripts/bench_short_chunks.py qwen3-0.6b [--steps 25]
"""

import argparse
import statistics
import time

import mlx.core as mx

from mlxserve.cache import KVStore, RowCache
from mlxserve.random_weights import build_random_model
from mlxserve.runner import Feed, Runner

CASES = [(8, 64, 2048), (4, 64, 2048), (1, 64, 2048), (8, 32, 4096), (16, 8, 1024), (8, 64, 8192)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("shape", help="a random-weights shape, e.g. qwen3-0.6b")
    parser.add_argument("--steps", type=int, default=25, help="steps per case, the first 5 not counted")
    args = parser.parse_args()
    model = build_random_model(args.shape).model
    kv = KVStore(*model.kv_shape(), mx.bfloat16, block_size=64)
    runner = Runner(model, kv)
    for rows_count, tokens, keys in CASES:
        rows = [RowCache(kv) for _ in range(rows_count)]
        for row in rows:
            row.reserve(keys + tokens)
            row.extend(keys)
        times = []
        for _ in range(args.steps):
            feeds = [Feed(i, list(range(1, tokens + 1)), keys, row, "last") for i, row in enumerate(rows)]
            mx.synchronize()
            start = time.perf_counter()
            out, batch = runner.forward(feeds)
            mx.eval(out)
            times.append(time.perf_counter() - start)
        groups = [(g.n_rows, g.tokens_per_row, g.chunked) for g in batch.groups]
        print(f"{args.shape} {rows_count} rows x {tokens} tokens over {keys} keys: "
              f"{1e3 * statistics.median(times[5:]):.2f} ms; groups (rows, tokens, chunked) {groups}", flush=True)
        for row in rows:
            row.release()


if __name__ == "__main__":
    main()
