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
        self.top_logprobs: list = []
        wants_prompt = request.params.prompt_logprobs is not None
        self.prompt_logprobs: list[float | None] | None = [None] * len(request.prompt_ids) if wants_prompt else None
        self.prompt_top: list | None = [[] for _ in request.prompt_ids] if wants_prompt else None
        self.first_token_time: float | None = None
        self.detok = None
        if tokenizer is not None:
            self.detok = tokenizer.detokenizer()
            self.detok.add(request.prompt_ids[-1])  # prime with the prompt's end so a continuation keeps its space
            self.detok.flush()
        self.text = StopTextTracker(request.params.stop)
        params = request.params
        self.stop_ids = set(params.stop_token_ids) | (set() if params.ignore_eos else set(eos_ids))

    def add_prompt_logprob(self, position: int, logprob: float, top) -> None:
        """The logprob of the prompt token at `position` (>= 1) given those before it, and the top alternatives."""
        self.prompt_logprobs[position] = logprob
        self.prompt_top[position] = top[: self.request.params.prompt_logprobs]

    def add_many(self, tokens: list[int], logprobs: list[float], tops: list | None) -> tuple[Event, str | None]:
        """Several tokens of one step (a verify window's), already accepted into the sequence: one event;
        the request ends at the first that ends it, and the sequence forgets the tokens after it."""
        event, reason = None, None
        for i, token in enumerate(tokens):
            generated = self.seq.generated
            cut = len(generated) - (len(tokens) - i - 1)  # the sequence as of this token
            kept, generated[cut:] = generated[cut:], []
            one, reason = self.add(token, logprobs[i], tops[i] if tops is not None else None)
            generated.extend(kept)
            event = one if event is None else _merge(event, one)
            if reason is not None:
                del generated[cut:]
                break
        return event, reason

    def add(self, token: int, logprob: float, top=None) -> tuple[Event, str | None]:
        """-> (the event for this token, the finish reason if the request ends with it). `top`: the most
        likely (token, logprob) pairs at this position, when the request asked for them."""
        self.first_token_time = self.first_token_time or time.monotonic()
        self.logprobs.append(logprob)
        top = top[: self.request.params.top_logprobs] if top is not None else None
        self.top_logprobs.append(top)
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
        params = self.request.params
        event = Event(self.request.id, [token], text, [logprob] if params.logprobs else None)
        event.top_logprobs = [top] if params.top_logprobs else None
        return event, reason

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
            top_logprobs=list(self.top_logprobs) if req.params.top_logprobs else None,
            prompt_logprobs=self.prompt_logprobs,
            prompt_top_logprobs=self.prompt_top,
            speculative_proposed=seq.proposed,
            speculative_accepted=seq.accepted,
        )


def _merge(first: Event, then: Event) -> Event:
    first.token_ids += then.token_ids
    first.text += then.text
    if first.logprobs is not None:
        first.logprobs += then.logprobs
    if first.top_logprobs is not None:
        first.top_logprobs += then.top_logprobs
    return first
