"""What speculative decoding can gain, and what it costs, on one model: single-stream greedy
decoding of 256 tokens after a 512-token prompt, plain, then with drafts that are always right
(the plain run's own continuation) and always wrong (each draft token off by one), for K = 3
and 7 draft tokens. The back-off after failed drafts is switched off, so that every step of the
"wrong" runs verifies a draft: real drafts land between the two bounds.

With --drafter dflash, every draft also runs a DFlash draft model (random weights at the
target's shape, spec/dflash.py) whose tokens are then replaced by the right or wrong ones: the
bounds include the draft model's cost, for K = 3, 7 and 15 (a z-lab draft's block).

    PYTHONPATH=src python3 scripts/bench_speculation_bounds.py qwen3-0.6b [--quantize 4]
    PYTHONPATH=src python3 scripts/bench_speculation_bounds.py qwen3-4b --drafter dflash
    PYTHONPATH=src python3 scripts/bench_speculation_bounds.py --model smollm2-135m

Prints generated tokens per second of each run, the ratio to plain, the draft tokens accepted,
and how far the ids match plain decoding's (in float32 all of them; in bf16 a verifying step
rounds differently and may flip a near-tie).
"""

import argparse
import time

from mlxserve import scheduler
from mlxserve.bench import prompt_vocab_size
from mlxserve.engine import Engine, EngineConfig
from mlxserve.sampling import SamplingParams

PROMPT_TOKENS, GEN_TOKENS = 512, 256


class OracleDrafter:
    """Drafts the reference continuation, or every token of it off by one."""

    def __init__(self, reference: list[int], wrong: bool, vocab: int):
        self.reference, self.wrong, self.vocab = reference, wrong, vocab

    def propose(self, tokens: list[int], k: int) -> list[int]:
        draft = self.reference[len(tokens) : len(tokens) + k]
        return [(t + 1) % self.vocab for t in draft] if self.wrong else draft


def dflash_oracle(draft, capacity_for, reference: list[int], wrong: bool, vocab: int):
    """A DFlash drafter that runs its draft model, then proposes the oracle's tokens."""
    from mlxserve.spec.dflash import DFlashDrafter

    oracle = OracleDrafter(reference, wrong, vocab)

    class Oracle(DFlashDrafter):
        def propose(self, tokens: list[int], k: int):
            pending = super().propose(tokens, k)
            pending.override = oracle.propose(tokens, k)  # (the draft still runs, with the step's others)
            return pending

    return Oracle(draft, capacity_for)


def timed(engine: Engine, prompt: list[int], params: SamplingParams) -> tuple[list[int], float]:
    engine.generate(prompt, params)  # warm: every shape this run meets is built
    start = time.perf_counter()
    ids = [t for event in engine.generate(prompt, params) for t in event.token_ids]
    return ids, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("shape", nargs="?", help="random weights at this shape (see `mlxserve bench --random-weights`)")
    parser.add_argument("--model", help="a model instead: alias, folder or .gguf")
    parser.add_argument("--quantize", type=int, choices=[4, 8])
    parser.add_argument("--dtype", help="random weights' dtype (default bfloat16)")
    parser.add_argument("--drafter", choices=["ngram", "dflash"], default="ngram",
                        help="dflash: also run a random DFlash draft model for every draft")
    args = parser.parse_args()
    if args.model:
        from mlxserve.loader import load_model
        from mlxserve.registry import resolve

        loaded = load_model(str(resolve(args.model, progress=True)), progress=False)
        name = args.model
    else:
        from mlxserve.random_weights import build_random_model

        loaded = build_random_model(args.shape, dtype=args.dtype, quantize=args.quantize)
        name = " ".join(filter(None, [args.shape, args.dtype, f"{args.quantize}-bit" if args.quantize else None]))
    vocab = prompt_vocab_size(loaded)
    prompt = [(100 + 7 * i) % vocab for i in range(PROMPT_TOKENS)]
    params = SamplingParams(max_tokens=GEN_TOKENS, temperature=0.0, ignore_eos=True)
    with Engine(loaded, EngineConfig()) as engine:
        reference, plain = timed(engine, prompt, params)
    print(f"{name}: plain {GEN_TOKENS / plain:.1f} tok/s", flush=True)
    scheduler.MAX_DRAFT_BACKOFF = 0
    for k in (3, 7, 15) if args.drafter == "dflash" else (3, 7):
        for wrong in (False, True):
            # In bf16 a step verifying a draft rounds differently from one decoding a token,
            # which can flip a near-tie and take the text elsewhere; the right drafts are then
            # the speculating run's own continuation, found by running it until it repeats.
            drafts = reference
            for _ in range(4):
                if args.drafter == "dflash":
                    scheduler.make_drafter = lambda _name, draft, capacity_for=None, d=drafts, w=wrong: dflash_oracle(draft, capacity_for, prompt + d, w, vocab)
                    config = EngineConfig(speculative="dflash", draft_model="random", draft_tokens=k)
                else:
                    scheduler.make_drafter = lambda _name, _draft=None, _capacity_for=None, d=drafts, w=wrong: OracleDrafter(prompt + d, w, vocab)
                    config = EngineConfig(speculative="ngram", draft_tokens=k)
                with Engine(loaded, config) as engine:
                    ids, seconds = timed(engine, prompt, params)
                    stats = engine.stats()
                if wrong or ids == drafts:
                    break
                drafts = ids
            same = next((f"from token {i}" for i, (a, b) in enumerate(zip(ids, reference)) if a != b), "all")
            print(f"{name}: K={k}, drafts always {'wrong' if wrong else 'right'}: {GEN_TOKENS / seconds:.1f} tok/s "
                  f"({plain / seconds:.2f}x plain); {stats['accepted_tokens']} of {stats['drafted_tokens']} "
                  f"draft tokens accepted (two runs); ids as plain: {same}", flush=True)

if __name__ == "__main__":
    main()
