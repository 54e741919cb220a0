#!/usr/bin/env bash
# Streaming (server-sent events) with curl: one `data: {...}` line per chunk, then `data: [DONE]`.
set -euo pipefail
BASE=${MLXSERVE_URL:-http://127.0.0.1:8000/v1}
MODEL=${MLXSERVE_MODEL:-smollm2-135m}
curl -sSN "$BASE/chat/completions" \
  -H "Content-Type: application/json" \
  -H "Authorization: Bearer ${MLXSERVE_API_KEY:-unused}" \
  -d "{\"model\": \"$MODEL\", \"max_tokens\": 64, \"stream\": true,
       \"stream_options\": {\"include_usage\": true},
       \"messages\": [{\"role\": \"user\", \"content\": \"Write a haiku about the sea.\"}]}"
