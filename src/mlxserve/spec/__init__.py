"""Speculative decoding: drafts that a row's target model verifies in its normal step.

A drafter proposes up to k tokens to follow a row's sequence; the scheduler feeds the row's
next token and the draft in one step, keeps the draft's longest prefix that matches what the
target itself samples, and rolls the rest back (scheduler.Scheduler). Greedy output, and
seeded sampled output, is the same with or without a drafter.
"""

from .ngram import NgramDrafter

DRAFTERS = ("ngram",)
# Draft tokens a row verifies per step: 3 keeps a verifying step as small as
# models.compiled.MAX_TOKENS_PER_ROW allows (the draft and the row's next token), so that it
# runs compiled at its own size instead of padded like a prefill chunk.
DEFAULT_DRAFT_TOKENS = 3
MAX_DRAFT_TOKENS = 16


def make_drafter(name: str):
    """A fresh per-row drafter by name (see DRAFTERS)."""
    if name == "ngram":
        return NgramDrafter()
    raise ValueError(f"speculative: unknown drafter {name!r} (known: {', '.join(DRAFTERS)})")


__all__ = ["DEFAULT_DRAFT_TOKENS", "DRAFTERS", "MAX_DRAFT_TOKENS", "NgramDrafter", "make_drafter"]
