"""Prompt-lookup drafting: propose the tokens that followed the last time the sequence's
newest n tokens appeared in it.

Generated text often repeats its context: code being edited, a document being quoted or
reformatted, a list being continued. When the last n tokens (n from `max_n` down to `min_n`)
occurred earlier in the prompt or the output, the tokens that came after them are a cheap
guess at what comes next, and the target model checks the guess in the same forward pass
that produces its next token (see scheduler.Scheduler, "speculation"). A wrong guess costs
only the verification of a few extra positions; greedy output is unchanged either way.
"""

from __future__ import annotations


class NgramDrafter:
    """Per-row index of the row's n-grams, grown as tokens arrive.

    `index[n][gram]` is the end of the latest occurrence of `gram` (an n-token tuple) that has
    at least one token after it, so its continuation is `tokens[end : end + k]`. The newest
    occurrence wins: recent context predicts best.
    """

    def __init__(self, min_n: int = 2, max_n: int = 4):
        if not 1 <= min_n <= max_n:
            raise ValueError(f"n-gram sizes: need 1 <= min_n <= max_n, got {min_n}, {max_n}")
        self.min_n, self.max_n = min_n, max_n
        self.index: dict[int, dict[tuple[int, ...], int]] = {n: {} for n in range(min_n, max_n + 1)}
        self.indexed = 0  # n-grams ending before this position are in the index

    def propose(self, tokens: list[int], k: int) -> list[int]:
        """Up to k tokens to follow `tokens` (a row's whole sequence so far), or none."""
        if k <= 0:
            return []
        # Index every n-gram ending at e <= len - 1: each has a token after it.
        for end in range(max(self.indexed, self.min_n), len(tokens)):
            for n in range(self.min_n, min(self.max_n, end) + 1):
                self.index[n][tuple(tokens[end - n : end])] = end
        self.indexed = max(self.indexed, len(tokens))
        for n in range(min(self.max_n, len(tokens)), self.min_n - 1, -1):
            end = self.index[n].get(tuple(tokens[len(tokens) - n :]))
            if end is not None:
                # The continuation may run into the n-gram just matched and past the end: it
                # goes on as the draft so far (a loop of period p repeats with period p).
                draft: list[int] = []
                for pos in range(end, end + k):
                    draft.append(tokens[pos] if pos < len(tokens) else draft[pos - len(tokens)])
                return draft
        return []
