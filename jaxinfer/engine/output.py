"""The output stage: sampled tokens -> incremental text, stop tokens and strings, events and results.

Host code. Each request gets an `OutputStream` when it is submitted; the engine feeds it every token
read back from the device and gets an `Event` (new tokens and text) plus, when the request ends, the
finish reason. Text that might be the start of a stop string is held back until it cannot be.
"""

from __future__ import annotations

import time

from jaxinfer.engine.requests import Event, Result
from jaxinfer.engine.scheduler import Sequence
from jaxinfer.engine.stops import StopTextTracker


class OutputStream:
    """One request's output so far: its tokens are the sequence's (`Sequence.generated`), read back and
    accepted by the scheduler before `add` sees each one."""

    def __init__(self, seq: Sequence, tokenizer, eos_ids: tuple[int, ...], max_context: int):
        request = seq.request
        self.seq, self.request = seq, request
        self.max_context = max_context
        self.logprobs: list[float] = []
        self.first_token_time: float | None = None
        self.detok = None
        if tokenizer is not None:
            self.detok = tokenizer.detokenizer()
            self.detok.add(request.prompt_ids[-1])  # prime with the prompt's end so a continuation keeps its space
            self.detok.flush()
        self.text = StopTextTracker(request.params.stop)
        params = request.params
        self.stop_ids = set(params.stop_token_ids) | (set() if params.ignore_eos else set(eos_ids))

    def add(self, token: int, logprob: float) -> tuple[Event, str | None]:
        """-> (the event for this token, the finish reason if the request ends with it)."""
        self.first_token_time = self.first_token_time or time.monotonic()
        self.logprobs.append(logprob)
        text, reason = "", None
        if token in self.stop_ids:
            reason = "stop"  # the stop token is returned in token_ids, never in text
        else:
            text = self.text.push(self.detok.add(token) if self.detok else "")
            reason = "stop" if self.text.stopped else None
        if reason is None and (
            len(self.seq.generated) >= self.request.params.max_tokens or self.seq.known >= self.max_context
        ):
            reason = "length"
        if reason is not None and not self.text.stopped:
            text += self.text.push(self.detok.flush() if self.detok else "") + self.text.finish()
        return Event(self.request.id, [token], text, [logprob] if self.request.params.logprobs else None), reason

    def result(self, reason: str) -> Result:
        req, seq = self.request, self.seq
        return Result(
            id=req.id,
            token_ids=list(seq.generated),
            text=self.text.text,
            finish_reason=reason,
            prompt_tokens=len(req.prompt_ids),
            logprobs=list(self.logprobs) if req.params.logprobs else None,
            ttft_s=(self.first_token_time - req.arrival_time) if self.first_token_time else None,
            total_s=time.monotonic() - req.arrival_time,
            preemptions=seq.preemptions,
            seed=seq.seed,
            cached_tokens=seq.cached_tokens,
        )
