"""OpenAI-compatible request bodies as pydantic models, and their conversion to the engine's sampling
parameters (checked once more, with the engine's limits, by the `RequestBuilder`).

Types are strict (a string is not a number, 1 is not true), and unknown top-level fields are refused
with a 400 naming them: a misspelled sampling field silently ignored would change the output without
a word. (vLLM accepts and logs them instead.) OpenAI fields this server does not implement (tools,
audio, a JSON `response_format`, ...) are refused by name, not ignored. Ranges the engine knows
(temperature, top_p, penalties, ...) are left to its validation, so both protocols say the same thing.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from jaxinfer.engine.requests import TOP_LOGPROBS_LIMIT

MAX_N = 8  # choices per prompt (`n`); each is one engine request
MAX_PROMPTS = 64  # prompts in one /v1/completions batch


class ProtocolError(ValueError):
    """A field of the body is wrong; `param` is its path (e.g. `messages[1].content`)."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


# OpenAI request fields with no implementation here: set to anything but null (or their off value), a 400.
_UNSUPPORTED = {
    "tools": (None, []),
    "tool_choice": (None, "none"),
    "functions": (None, []),
    "function_call": (None, "none"),
    "parallel_tool_calls": (None,),
    "audio": (None,),
    "modalities": (None, ["text"]),
    "prediction": (None,),
    "web_search_options": (None,),
    "reasoning_effort": (None,),
    "suffix": (None, ""),
    "best_of": (None, 1),
}


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class StreamOptions(_Body):
    include_usage: bool = False


class _Sampling(_Body):
    """The fields completions and chat share: OpenAI's, then the vLLM-style extensions."""

    model: str | None = None
    max_tokens: int | None = None
    temperature: float | None = None  # OpenAI's default is 1 (sampled), the engine's 0 (greedy): 1 here
    top_p: float | None = None
    n: int = Field(1, ge=1, le=MAX_N)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: Any = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    seed: int | None = None
    user: str | None = None  # accepted, not used
    # extensions (vLLM's names)
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    ignore_eos: bool = False
    stop_token_ids: list[int] | None = None

    @field_validator("stop")
    @classmethod
    def _stop(cls, value):
        if value is None or isinstance(value, str):
            return value
        if isinstance(value, list) and all(isinstance(s, str) for s in value):
            return value
        raise ValueError("must be a string or a list of strings")

    def sampling(self, max_tokens: int | None, logprobs: bool, top_logprobs: int, prompt_logprobs=None) -> dict:
        """The engine's sampling parameters (a dict for `RequestBuilder`), leaving out what was not given."""
        params = dict(
            max_tokens=max_tokens,
            temperature=1.0 if self.temperature is None else self.temperature,
            top_p=self.top_p,
            seed=self.seed,
            stop=[self.stop] if isinstance(self.stop, str) else self.stop,
            presence_penalty=self.presence_penalty,
            frequency_penalty=self.frequency_penalty,
            logit_bias=self.logit_bias,
            top_k=self.top_k,
            min_p=self.min_p,
            repetition_penalty=self.repetition_penalty,
            ignore_eos=self.ignore_eos,
            stop_token_ids=self.stop_token_ids,
            logprobs=logprobs,
            top_logprobs=top_logprobs,
            prompt_logprobs=prompt_logprobs,
        )
        return {k: v for k, v in params.items() if v is not None}

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


def choice_seeds(seed: int | None, n: int) -> list[int | None]:
    """Seeds of the n choices of one prompt: seed, seed+1, ... (mod 2**32) when given, else each drawn by the engine."""
    if seed is None or not 0 <= seed < 2**32:
        return [seed] * n
    return [(seed + i) % 2**32 for i in range(n)]


class CompletionRequest(_Sampling):
    prompt: Any
    max_tokens: int | None = 16  # OpenAI's default for completions
    echo: bool = False
    logprobs: int | None = Field(None, ge=0, le=TOP_LOGPROBS_LIMIT)

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, value):
        """A string, a list of strings, a list of token ids, or a list of lists of token ids."""
        if isinstance(value, str):
            return [value]
        if not isinstance(value, list) or not value:
            raise ValueError("must be a string, a list of strings, a list of token ids or a list of such lists")
        if all(isinstance(p, str) for p in value):
            prompts = value
        elif all(_integer(t) for t in value):
            prompts = [value]
        elif all(isinstance(p, list) and p and all(_integer(t) for t in p) for p in value):
            prompts = value
        else:
            raise ValueError("must be a string, a list of strings, a list of token ids or a list of such lists")
        if len(prompts) > MAX_PROMPTS:
            raise ValueError(f"holds {len(prompts)} prompts, more than the limit of {MAX_PROMPTS}")
        return prompts

    def engine_params(self) -> dict:
        top = self.logprobs
        prompt_logprobs = top if self.echo and top is not None else None
        return self.sampling(self.max_tokens, top is not None, top or 0, prompt_logprobs)


class TextPart(_Body):
    type: Literal["text"]
    text: str


class ChatMessage(_Body):
    role: str
    content: str | list[TextPart] | None = None
    name: str | None = None  # accepted, not used

    @field_validator("content", mode="before")
    @classmethod
    def _content(cls, value):
        if isinstance(value, list):
            for i, part in enumerate(value):
                if not isinstance(part, dict) or part.get("type") != "text":
                    kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                    raise ValueError(f"part {i} is of type {kind!r}: only text parts are supported")
        return value

    def text(self) -> str:
        """The content as one string: text parts joined by newlines (as vLLM does), no content as ''."""
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "\n".join(part.text for part in self.content)


class ResponseFormat(_Body):
    type: str
    json_schema: Any = None  # declared so a json_schema format is refused by its type, not as an unknown field


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=TOP_LOGPROBS_LIMIT)
    response_format: ResponseFormat | None = None

    def engine_params(self, max_context: int) -> dict:
        if self.top_logprobs is not None and not self.logprobs:
            raise ProtocolError("top_logprobs needs logprobs set to true", "top_logprobs")
        if self.response_format is not None and self.response_format.type != "text":
            raise ProtocolError(
                f"response_format type {self.response_format.type!r} is not supported (only 'text'): "
                f"this server does not constrain output to JSON",
                "response_format",
            )
        limit = self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens
        # no limit given: as many as fit in the context (the engine ends the request there, finish_reason length)
        return self.sampling(max_context if limit is None else limit, self.logprobs, self.top_logprobs or 0)

    def conversation(self) -> list[dict]:
        return [{"role": m.role, "content": m.text()} for m in self.messages]


class TokenizeRequest(_Body):
    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool = True
    add_generation_prompt: bool = True


class DetokenizeRequest(_Body):
    model: str | None = None
    tokens: list[int]


def parse(model: type[_Body], body: dict) -> Any:
    """`body` as `model`, or a ProtocolError naming the first bad field and what is wrong with it."""
    for name, allowed in _UNSUPPORTED.items():
        if name in body and body[name] not in allowed and name in _unsupported_for(model):
            raise ProtocolError(f"{name} is not supported by this server", name)
    try:
        return model.model_validate(body)
    except ValidationError as e:
        error = e.errors(include_url=False)[0]
        param = _path(error["loc"])
        message = error["msg"].removeprefix("Value error, ")
        if error["type"] == "extra_forbidden":
            raise ProtocolError(f"{param}: unknown field (not in the {_wire_name(model)} request)", param) from None
        if error["type"] == "missing":
            raise ProtocolError(f"{param}: required field missing", param) from None
        shown = repr(error.get("input"))
        got = f" (got {shown})" if len(shown) <= 80 else ""
        raise ProtocolError(f"{param}: {message}{got}", param) from None


def _unsupported_for(model) -> tuple[str, ...]:
    return tuple(_UNSUPPORTED) if issubclass(model, _Sampling) else ()


def _wire_name(model) -> str:
    return {
        CompletionRequest: "completions",
        ChatCompletionRequest: "chat completions",
        TokenizeRequest: "tokenize",
        DetokenizeRequest: "detokenize",
    }.get(model, model.__name__)


def _path(loc: tuple) -> str:
    """pydantic's location ('messages', 1, 'content') as `messages[1].content`."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part in ("str", "list[TextPart]") or "[" in str(part):  # a union member's name, not a field
            continue
        else:
            out += f".{part}" if out else str(part)
    return out


def _integer(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)
