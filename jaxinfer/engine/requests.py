"""Requests, their sampling parameters (validated at the edge), and finished results."""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Mapping
from typing import Any

TopLogprobs = list[tuple[int, float]]  # (token id, logprob), most likely first


class RequestError(ValueError):
    """A request field is invalid; the message names the field, the value and the limit."""


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 256
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    logprobs: bool = False  # the log-probability of each sampled token under the raw model
    top_logprobs: int = 0  # also the TOP_LOGPROBS_LIMIT most likely tokens at each sampled position, up to this many
    prompt_logprobs: int | None = None  # None: off; N: each prompt token's logprob and its N most likely alternatives
    presence_penalty: float = 0.0  # subtracted once from the logit of every token generated so far
    frequency_penalty: float = 0.0  # subtracted per occurrence from the logit of every token generated so far
    repetition_penalty: float = 1.0  # divides positive (multiplies negative) logits of prompt and generated tokens
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, bias) added to the logit before sampling

    @property
    def penalized(self) -> bool:
        """The logits are adjusted (penalties or bias) before sampling: the engine keeps the slot's token counts."""
        return bool(
            self.presence_penalty or self.frequency_penalty or self.repetition_penalty != 1.0 or self.logit_bias
        )

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any], where: str = "") -> SamplingParams:
        """Builds params from user JSON, refusing unknown keys; values are checked by `validate`."""
        known = {f.name: f for f in dataclasses.fields(cls)}
        values = {}
        for key, value in raw.items():
            if key not in known:
                raise RequestError(f"{where}unknown sampling parameter {key!r}; known: {', '.join(known)}")
            if key == "logit_bias":
                value = _bias_pairs(value, where)
            elif key in ("stop", "stop_token_ids"):
                if isinstance(value, (str, int)):
                    value = [value]
                if not isinstance(value, (list, tuple)):
                    raise RequestError(f"{where}{key}={value!r} must be a list")
                value = tuple(value)
            values[key] = value
        return cls(**values)

    def validate(self, max_tokens_limit: int | None = None, vocab_size: int | None = None, where: str = "") -> None:
        def bad(field, limit):
            return RequestError(f"{where}{field}={getattr(self, field)!r} {limit}")

        def number(field):
            value = getattr(self, field)
            return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)

        if not isinstance(self.max_tokens, int) or isinstance(self.max_tokens, bool) or self.max_tokens < 1:
            raise bad("max_tokens", "must be an integer >= 1")
        if max_tokens_limit is not None and self.max_tokens > max_tokens_limit:
            raise bad("max_tokens", f"exceeds the limit of {max_tokens_limit}")
        if not number("temperature") or self.temperature < 0:
            raise bad("temperature", "must be a number >= 0")
        if not isinstance(self.top_k, int) or isinstance(self.top_k, bool) or self.top_k < 0:
            raise bad("top_k", "must be an integer >= 0 (0 = off)")
        if not number("top_p") or not 0 < self.top_p <= 1:
            raise bad("top_p", "must be in (0, 1]")
        if not number("min_p") or not 0 <= self.min_p < 1:
            raise bad("min_p", "must be in [0, 1)")
        if self.seed is not None and (
            not isinstance(self.seed, int) or isinstance(self.seed, bool) or not 0 <= self.seed < 2**32
        ):
            raise bad("seed", "must be an integer in [0, 2**32)")
        if not all(isinstance(s, str) and s for s in self.stop):
            raise bad("stop", "must be non-empty strings")
        for t in self.stop_token_ids:
            if not isinstance(t, int) or isinstance(t, bool) or t < 0 or (vocab_size and t >= vocab_size):
                raise RequestError(
                    f"{where}stop_token_ids contains {t!r}: must be token ids in [0, {vocab_size or 'vocab'})"
                )
        for flag in ("ignore_eos", "logprobs"):
            if not isinstance(getattr(self, flag), bool):
                raise bad(flag, "must be true or false")
        if not _integer(self.top_logprobs) or not 0 <= self.top_logprobs <= TOP_LOGPROBS_LIMIT:
            raise bad("top_logprobs", f"must be an integer in [0, {TOP_LOGPROBS_LIMIT}]")
        if self.prompt_logprobs is not None and (
            not _integer(self.prompt_logprobs) or not 0 <= self.prompt_logprobs <= TOP_LOGPROBS_LIMIT
        ):
            raise bad("prompt_logprobs", f"must be null or an integer in [0, {TOP_LOGPROBS_LIMIT}]")
        for field in ("presence_penalty", "frequency_penalty"):
            if not number(field) or not -2 <= getattr(self, field) <= 2:
                raise bad(field, "must be a number in [-2, 2]")
        if not number("repetition_penalty") or not 0 < self.repetition_penalty <= 10:
            raise bad("repetition_penalty", "must be a number in (0, 10] (1 = off)")
        for token, bias in self.logit_bias:
            if not _integer(token) or token < 0 or (vocab_size and token >= vocab_size):
                raise RequestError(
                    f"{where}logit_bias has token {token!r}: must be a token id in [0, {vocab_size or 'vocab'})"
                )
            if isinstance(bias, bool) or not isinstance(bias, (int, float)) or not -100 <= bias <= 100:
                raise RequestError(f"{where}logit_bias[{token}]={bias!r} must be a number in [-100, 100]")


TOP_LOGPROBS_LIMIT = 20  # the most alternatives per position a request may ask for (OpenAI's limit)


def _integer(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _bias_pairs(value, where: str) -> tuple[tuple[int, float], ...]:
    """logit_bias as (token, bias) pairs, from a mapping (JSON keys may be strings of digits) or pairs."""
    items = value.items() if isinstance(value, Mapping) else value
    if not isinstance(items, (list, tuple, type({}.items()))):
        raise RequestError(f"{where}logit_bias={value!r} must be an object mapping token ids to biases")
    pairs = {}
    for item in items:
        if not isinstance(item, (list, tuple)) or len(item) != 2:
            raise RequestError(f"{where}logit_bias entry {item!r} must be a (token id, bias) pair")
        token, bias = item
        if isinstance(token, str) and token.strip().isdigit():
            token = int(token)
        pairs[token] = bias
    return tuple(pairs.items())


@dataclasses.dataclass
class Request:
    id: str
    prompt_ids: list[int]
    params: SamplingParams = dataclasses.field(default_factory=SamplingParams)
    arrival_time: float = dataclasses.field(default_factory=time.monotonic)


@dataclasses.dataclass
class Result:
    id: str
    token_ids: list[int]
    text: str
    finish_reason: str  # stop | length | cancelled | error
    prompt_tokens: int
    logprobs: list[float] | None
    ttft_s: float | None
    total_s: float
    preemptions: int = 0
    seed: int | None = None  # the seed the request ran with (drawn from the OS when it gave none)
    cached_tokens: int = 0  # prompt tokens served from the prefix cache instead of computed
    top_logprobs: list[TopLogprobs] | None = None  # per generated token, when params.top_logprobs
    # per prompt token when params.prompt_logprobs is set: its logprob given the tokens before it (None for
    # the first), and the params.prompt_logprobs most likely tokens at that position (empty for the first)
    prompt_logprobs: list[float | None] | None = None
    prompt_top_logprobs: list[TopLogprobs] | None = None
    speculative_proposed: int = 0  # proposals verified for this request (speculative decoding)
    speculative_accepted: int = 0  # of those, accepted

    @property
    def completion_tokens(self) -> int:
        return len(self.token_ids)


@dataclasses.dataclass
class Event:
    """What one step produced for one request: new tokens/text, and the result when it finished."""

    request_id: str
    token_ids: list[int]
    text: str
    logprobs: list[float] | None
    result: Result | None = None
    top_logprobs: list[TopLogprobs] | None = None  # per token, when params.top_logprobs
