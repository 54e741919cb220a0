#!/usr/bin/env bash
# Speculative decoding by prompt lookup (`--speculative ngram`): the same greedy request twice,
# without and with it, printing each run's decode speed and how many draft tokens the model
# accepted. The text is the same both times; the speed-up comes where the answer repeats its
# prompt, as when a coding model edits code it was given.
#
# Model: $MLXSERVE_MODEL, default qwen2.5-coder-0.5b (pulled on first use, 491 MB). Extra flags
# are passed to both runs, e.g. `examples/speculative.sh --draft-tokens 8 --max-tokens 200`.
set -euo pipefail
MODEL="${MLXSERVE_MODEL:-qwen2.5-coder-0.5b}"
PROMPT='Add type hints to this Python function. Change nothing else and reply with the code only.

def moving_average(values, window):
    result = []
    total = 0.0
    for i, value in enumerate(values):
        total += value
        if i >= window:
            total -= values[i - window]
        if i >= window - 1:
            result.append(total / window)
    return result'
run() {  # prints the run's JSON object; mlxserve's progress goes to stderr
  mlxserve run --model "$MODEL" --temperature 0 --max-tokens 120 --json "$@" "$PROMPT"
}
plain=$(run "$@")
speculative=$(run --speculative ngram "$@")
python3 - "$plain" "$speculative" <<'PY'
import json, sys
plain, speculative = (json.loads(a) for a in sys.argv[1:])
print(plain["text"])
for name, r in (("plain", plain), ("--speculative ngram", speculative)):
    spec = r.get("speculative")
    drafts = f", {spec['accepted_tokens']} of {spec['drafted_tokens']} draft tokens accepted" if spec else ""
    print(f"{name:<20} {r['completion_tokens']} tokens, {r['timings']['decode_tok_s']} tok/s{drafts}")
print("same text:", "yes" if plain["token_ids"] == speculative["token_ids"] else "NO")
PY
