"""Requests, their sampling parameters (validated at the edge), and finished results."""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Mapping
from typing import Any


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
    logprobs: bool = False

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any], where: str = "") -> SamplingParams:
        """Builds params from user JSON, refusing unknown keys; values are checked by `validate`."""
        known = {f.name: f for f in dataclasses.fields(cls)}
        values = {}
        for key, value in raw.items():
            if key not in known:
                raise RequestError(f"{where}unknown sampling parameter {key!r}; known: {', '.join(known)}")
            if key in ("stop", "stop_token_ids"):
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
