"""`mlxserve bench` with a record of every step's decoding groups: whether each group's rows
lay in consecutive slots (a view), in a run with gaps (a view of the run, see
batch.DECODE_SPAN_MAX_RATIO) or were gathered, and the time from each step's batch to the
next one's, by kind of step. Prints a summary after the bench's own output; the arguments are
the bench's.

    PYTHONPATH=src:scripts python3 scripts/decode_groups.py bench --random-weights qwen3-0.6b \\
        --concurrency 64 --prompt-tokens 512 --gen-tokens 128 --runs 1 --warmup 1
"""

import collections
import statistics
import sys
import time

from mlxserve import runner
from mlxserve.cli import main

STEPS = []  # (when the batch was built, decoding rows, prefill tokens, [(kind, rows, slots spanned)])


def recording(build_batch):
    def build(*args, **kwargs):
        batch = build_batch(*args, **kwargs)
        groups = []
        for g in batch.groups:
            if g.tokens_per_row != 1:
                continue
            if g.first_slot is None:
                slots = g.slots.tolist()
                groups.append(("gathered", g.n_rows, max(slots) - min(slots) + 1))
            else:
                groups.append(("run with gaps" if g.span_queries is not None else "consecutive", g.n_rows, g.slot_count))
        prefill = sum(g.tokens_per_row for g in batch.groups if g.tokens_per_row > 1)
        STEPS.append((time.perf_counter(), sum(n for _, n, _ in groups), prefill, groups))
        return batch
    return build


def summary() -> None:
    # A gap of over a second between steps is the bench between engines, not a step.
    timed = [(step, after[0] - step[0]) for step, after in zip(STEPS, STEPS[1:]) if after[0] - step[0] < 1.0]
    print(f"\n{len(STEPS)} steps recorded")
    for name, keep in (("decoding only", lambda s: s[1] and not s[2]), ("decoding and a prompt chunk", lambda s: s[1] and s[2]),
                       ("prompt chunks only", lambda s: not s[1])):
        times = [dt for step, dt in timed if keep(step)]
        if times:
            print(f"  {name}: {len(times)} steps, median {1e3 * statistics.median(times):.2f} ms to the next")
    kinds = collections.defaultdict(list)
    for step, dt in timed:
        if step[1] and not step[2] and len(step[3]) == 1:
            kinds[step[3][0][0]].append((dt, step[3][0][2] / step[3][0][1]))
    for kind, items in kinds.items():
        print(f"  decoding only, one group {kind}: {len(items)} steps, median {1e3 * statistics.median(d for d, _ in items):.2f} ms,"
              f" slots spanned per row up to {max(r for _, r in items):.2f}")


if __name__ == "__main__":
    runner.build_batch = recording(runner.build_batch)
    code = main(sys.argv[1:])
    summary()
    sys.exit(code)
