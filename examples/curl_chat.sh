#!/usr/bin/env bash
# A chat completion with curl. Start a server first: mlxserve serve
set -euo pipefail
BASE=${MLXSERVE_URL:-http://127.0.0.1:8000/v1}
MODEL=${MLXSERVE_MODEL:-smollm2-135m}
curl -sS "$BASE/chat/completions" \
  -H "Content-Type: application/json" \
  -H "Authorization: Bearer ${MLXSERVE_API_KEY:-unused}" \
  -d "{\"model\": \"$MODEL\", \"max_tokens\": 64,
       \"messages\": [{\"role\": \"user\", \"content\": \"Why is the sky blue?\"}]}"
echo
