"""`mlxserve` with one of the scheduler's tunings changed, for A/B runs on the GPU machine:
the same command with and without the environment variable, on the same warm machine.

    NO_DEVICE_WAIT=1  the scheduler queues every step without waiting for the device to
                      finish the previous one (Scheduler._wait_for_device: K/V shelves are
                      then copied instead of written in place; the host's graph building
                      overlaps the device's work)
    ALWAYS_DEVICE_WAIT=1  every step waits, also where Scheduler._copies_are_cheap would
                      queue it at once (the behaviour before 2026-12-05's session 19)
    CHUNK_ATTENTION_MAX_TOKENS=N  batch.CHUNK_ATTENTION_MAX_TOKENS (0: short chunks over long
                      histories go through MLX's fused attention)
    FULL_CHUNK_KEYS=N scheduler.FULL_CHUNK_KEYS (a chunk next to decoding rows shrinks beyond
                      this many keys)
    QUEUE_WITHOUT_WAIT_BYTES=N  scheduler.QUEUE_WITHOUT_WAIT_BYTES (decoding steps are queued
                      without waiting while the shelves hold at most N bytes)
    DECODE_SPAN_MAX_RATIO=N  batch.DECODE_SPAN_MAX_RATIO (decoding rows with gaps between their
                      slots read the run of slots while it is at most N times their number;
                      0: they always gather)
    FUSED_DECODE=0|1  batch.FUSED_DECODE (decoding rows attend through MLX's fused attention
                      with their runs of slots padded and keys rounded up; default: batch.fuses_decoding's rule)
    BUDGET_ROWS=N     SchedulerConfig.budget_rows (beside more decoding rows than this the
                      mixed prefill budget grows in proportion to them)
    COARSE_PAD_FROM=N padded steps of more than N tokens are padded to a multiple of 4 x
                      MULTI_TOKEN_BUCKET instead (fewer sizes, so fewer first-time traces)
    LINEAR_AS_CONV=1  plain linear layers run their products of several rows as width-one
                      convolutions (models/products.py: cuDNN's cached plan instead of
                      cuBLASLt's setup at every call)
    DEQUANTIZE_FROM_ROWS=N  products.DEQUANTIZE_FROM_ROWS (on a CUDA GPU, quantized layers'
                      products of at least N rows dequantize the weight and multiply it
                      plainly; 0: never, MLX's quantized kernel for every product)

    NO_DEVICE_WAIT=1 PYTHONPATH=src python3 scripts/bench_variant.py bench --random-weights qwen3-4b \\
        --quantize 4 --concurrency 1 --compare mlx-lm
"""

import os
import sys
from dataclasses import replace

from mlxserve import batch, scheduler
from mlxserve.cli import main
from mlxserve.models import products


def apply_tunings() -> None:
    """Set the tunings named by the environment variables above (the profile scripts call it
    too, so that their A/B runs take the same variables)."""
    if os.environ.get("NO_DEVICE_WAIT"):
        scheduler.Scheduler._wait_for_device = lambda self, skip=False: None
    if os.environ.get("ALWAYS_DEVICE_WAIT"):
        scheduler.Scheduler._copies_are_cheap = lambda self, decode, rows: False
    if "CHUNK_ATTENTION_MAX_TOKENS" in os.environ:
        batch.CHUNK_ATTENTION_MAX_TOKENS = int(os.environ["CHUNK_ATTENTION_MAX_TOKENS"])
    if "FULL_CHUNK_KEYS" in os.environ:
        scheduler.FULL_CHUNK_KEYS = int(os.environ["FULL_CHUNK_KEYS"])
    if "QUEUE_WITHOUT_WAIT_BYTES" in os.environ:
        scheduler.QUEUE_WITHOUT_WAIT_BYTES = int(os.environ["QUEUE_WITHOUT_WAIT_BYTES"])
    if "DECODE_SPAN_MAX_RATIO" in os.environ:
        batch.DECODE_SPAN_MAX_RATIO = float(os.environ["DECODE_SPAN_MAX_RATIO"])
    if "FUSED_DECODE" in os.environ:
        batch.FUSED_DECODE = os.environ["FUSED_DECODE"] == "1"
    if "BUDGET_ROWS" in os.environ:
        init = scheduler.Scheduler.__init__

        def with_budget_rows(self, runner, tokenizer, config, *args, **kwargs):
            init(self, runner, tokenizer, replace(config, budget_rows=int(os.environ["BUDGET_ROWS"])), *args, **kwargs)

        scheduler.Scheduler.__init__ = with_budget_rows
    if "COARSE_PAD_FROM" in os.environ:
        coarse_from, fine = int(os.environ["COARSE_PAD_FROM"]), batch.padding_for

        def coarse_padding(num_tokens, pad_to):
            return fine(num_tokens, pad_to * 4 if num_tokens > coarse_from else pad_to)

        batch.padding_for = coarse_padding
    if os.environ.get("LINEAR_AS_CONV"):
        products.enabled = True
    if "DEQUANTIZE_FROM_ROWS" in os.environ:
        products.DEQUANTIZE_FROM_ROWS = int(os.environ["DEQUANTIZE_FROM_ROWS"]) or None


if __name__ == "__main__":
    apply_tunings()
    sys.exit(main(sys.argv[1:]))
