"""Speculative decoding: drafts that a row's target model verifies in its normal step.

A drafter proposes up to k tokens to follow a row's sequence; the scheduler feeds the row's
next token and the draft in one step, keeps the draft's longest prefix that matches what the
target itself samples, and rolls the rest back (scheduler.Scheduler). Greedy output, and
seeded sampled output, is the same with or without a drafter.

Drafters: "ngram" proposes what followed the last occurrence of the newest few tokens
(prompt lookup, spec/ngram.py); "dflash" runs a DFlash draft model over the target's own
hidden states (spec/dflash.py).
"""

from .ngram import NgramDrafter

DRAFTERS = ("ngram", "dflash")
# Draft tokens a row verifies per step: 3 keeps a verifying step as small as
# models.compiled.MAX_TOKENS_PER_ROW allows (the draft and the row's next token), so that it
# runs compiled at its own size instead of padded like a prefill chunk.
DEFAULT_DRAFT_TOKENS = 3
MAX_DRAFT_TOKENS = 16


def default_draft_tokens(name: str, draft=None) -> int:
    """Draft tokens per step when none are asked for: a DFlash draft's block (the anchor
    and the tokens it was trained to draft), else DEFAULT_DRAFT_TOKENS."""
    if name == "dflash" and draft is not None:
        return max(1, min(draft.block_size - 1, MAX_DRAFT_TOKENS))
    return DEFAULT_DRAFT_TOKENS


def make_drafter(name: str, draft=None, capacity_for=None):
    """A fresh per-row drafter by name (see DRAFTERS); "dflash" drafts with `draft`, a
    spec.dflash.DFlashDraft, its context buffers growing by `capacity_for` (the KV's rule)."""
    if name == "ngram":
        return NgramDrafter()
    if name == "dflash":
        if draft is None:
            raise ValueError("speculative: dflash needs a draft model (--draft-model)")
        from .dflash import DFlashDrafter

        return DFlashDrafter(draft, capacity_for)
    raise ValueError(f"speculative: unknown drafter {name!r} (known: {', '.join(DRAFTERS)})")


def resolve_drafts(pending: list) -> list[list[int]]:
    """The tokens of drafts a drafter left pending (a draft model's, spec.dflash): computed
    together, in one evaluation."""
    from .dflash import resolve_drafts as resolve

    return resolve(pending)


__all__ = ["DEFAULT_DRAFT_TOKENS", "DRAFTERS", "MAX_DRAFT_TOKENS", "NgramDrafter", "default_draft_tokens",
           "make_drafter", "resolve_drafts"]
