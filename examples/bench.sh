#!/usr/bin/env bash
# `mlxserve bench` on random weights at a tiny shape: no download, a few seconds even on MLX's
# CPU back-end. It measures mlxserve at 1 and 4 requests in flight against mlx-lm on the same
# weights, and a chat's second turn with the prefix cache and without; figures go to the
# terminal and, all of them with the configuration and versions, to bench.json.
#
# Extra flags are passed on and win over the ones here. Real shapes give figures worth
# comparing (bfloat16 weights of the model's size, still random), e.g. on a Mac:
#   examples/bench.sh --random-weights qwen3-0.6b --concurrency 1,32,64 --prompt-tokens 512 \
#     --gen-tokens 128 --chat-history-tokens 4096 --long-prompt-tokens 16384
set -euo pipefail
mlxserve bench --random-weights tiny \
  --concurrency 1,4 --prompt-tokens 64 --gen-tokens 16 --runs 1 --warmup 1 \
  --compare mlx-lm --chat-history-tokens 256 \
  --json bench.json "$@"
