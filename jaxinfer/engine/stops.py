"""Incremental output text with stop strings: text that might be the start of a stop string is held back."""

from __future__ import annotations


class StopTextTracker:
    """Feeds detokenized pieces; `push` returns text safe to emit and whether a stop string was hit."""

    def __init__(self, stops: tuple[str, ...]):
        self.stops = stops
        self.text = ""  # everything accepted so far (stop string excluded)
        self.emitted = 0  # chars of self.text already returned
        self.stopped = False

    def push(self, piece: str) -> str:
        if self.stopped:
            return ""
        self.text += piece
        if self.stops:
            cut = min(
                (i for i in (self.text.find(s, max(0, self.emitted - len(s))) for s in self.stops) if i >= 0),
                default=-1,
            )
            if cut >= 0:
                self.text = self.text[:cut]
                self.stopped = True
                return self._release(len(self.text))
            hold = max((k for s in self.stops for k in range(1, len(s)) if self.text.endswith(s[:k])), default=0)
            return self._release(len(self.text) - hold)
        return self._release(len(self.text))

    def finish(self) -> str:
        return self._release(len(self.text))

    def _release(self, upto: int) -> str:
        upto = max(upto, self.emitted)
        out = self.text[self.emitted : upto]
        self.emitted = upto
        return out
