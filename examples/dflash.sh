#!/usr/bin/env bash
# Speculative decoding with a DFlash draft model (`--speculative dflash`): the same greedy
# request twice, without and with it, printing each run's decode speed and how many draft
# tokens the model accepted. The text is the same both times.
#
# Model: $MLXSERVE_MODEL, default Qwen/Qwen3-4B (8 GB, downloaded on first use); its draft:
# $MLXSERVE_DRAFT_MODEL, default z-lab/Qwen3-4B-DFlash-b16 (trained for Qwen3-4B answering
# without reasoning first, hence --no-think). Extra flags are passed to both runs, e.g.
# `examples/dflash.sh --max-tokens 512`.
set -euo pipefail
MODEL="${MLXSERVE_MODEL:-Qwen/Qwen3-4B}"
DRAFT="${MLXSERVE_DRAFT_MODEL:-z-lab/Qwen3-4B-DFlash-b16}"
PROMPT='How many positive whole-number divisors does 196 have? Work it out step by step.'
run() {  # prints the run's JSON object; mlxserve's progress goes to stderr
  mlxserve run --model "$MODEL" --no-think --temperature 0 --max-tokens 256 --json "$@" "$PROMPT"
}
plain=$(run "$@")
speculative=$(run --speculative dflash --draft-model "$DRAFT" "$@")
python3 - "$plain" "$speculative" <<'PY'
import json, sys
plain, speculative = (json.loads(a) for a in sys.argv[1:])
print(plain["text"])
for name, r in (("plain", plain), ("--speculative dflash", speculative)):
    spec = r.get("speculative")
    drafts = f", {spec['accepted_tokens']} of {spec['drafted_tokens']} draft tokens accepted" if spec else ""
    print(f"{name:<22} {r['completion_tokens']} tokens, {r['timings']['decode_tok_s']} tok/s{drafts}")
print("same text:", "yes" if plain["token_ids"] == speculative["token_ids"] else "NO")
PY
