"""Prompt lookup (`--speculative ngram`): propose the tokens that followed the latest earlier occurrence
of the sequence's last n tokens, in its own prompt and output. Pure host code.

Each sequence keeps an index from every n-gram (n in [NGRAM_MIN, NGRAM_MAX]) of its tokens to where it
last ended, updated as tokens are known, so a lookup costs a few dictionary probes whatever the length.
The longest n with an earlier match wins: longer matches predict better. A match that ends within
the last n tokens (repeated text) continues with the period it implies.
"""

from __future__ import annotations

NGRAM_MAX = 4
NGRAM_MIN = 2


class NgramIndex:
    def __init__(self):
        self.tokens: list[int] = []
        self.ends: dict[tuple[int, ...], int] = {}  # n-gram -> end (exclusive) of its latest occurrence
        self._pending: dict[tuple[int, ...], int] = {}  # the current suffixes: indexed once a token follows

    def extend(self, tokens) -> None:
        for token in tokens:
            self.ends.update(self._pending)  # the previous suffixes now have a continuation
            self.tokens.append(token)
            end = len(self.tokens)
            self._pending = {tuple(self.tokens[end - n : end]): end for n in range(NGRAM_MIN, min(NGRAM_MAX, end) + 1)}

    def propose(self, limit: int) -> list[int]:
        """Up to `limit` tokens continuing the latest earlier match of the longest suffix that has one."""
        end = len(self.tokens)
        for n in range(min(NGRAM_MAX, end), NGRAM_MIN - 1, -1):
            at = self.ends.get(tuple(self.tokens[end - n :]))
            if at is not None:  # a match overlapping the suffix repeats with period end - at
                out: list[int] = []
                for i in range(at, at + limit):
                    out.append(self.tokens[i] if i < end else out[i - end])
                return out
        return []


def index_for(seq) -> NgramIndex:
    """`seq`'s index, brought up to date with the tokens the host knows."""
    if seq.ngram is None:
        seq.ngram = NgramIndex()
    index = seq.ngram
    if len(index.tokens) < seq.known:
        index.extend(seq.known_tokens(len(index.tokens), seq.known))
    return index
