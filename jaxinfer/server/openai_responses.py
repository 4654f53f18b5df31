"""OpenAI-shaped response bodies (plain dicts, serialized once) from the engine's Events and Results:
completions and chat completions, whole or as stream chunks, with usage and both logprobs shapes.

Engine logprobs arrive as floats per token and `[(token id, logprob), ...]` alternatives per token;
OpenAI names tokens by their text, so each id is spelled as the bytes it stands for, decoded as UTF-8
(a byte that is part of a longer character shows as U+FFFD; chat logprobs carry the raw `bytes` too).
"""

from __future__ import annotations

import time
import uuid


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int) -> dict:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "prompt_tokens_details": {"cached_tokens": cached_tokens},
    }


def usage_of(results, prompts_once: list) -> dict:
    """Usage of a request's results: each prompt counted once (its first choice's prompt and cached
    tokens, as the n choices of a prompt share it), every choice's completion tokens."""
    return usage(
        sum(r.prompt_tokens for r in prompts_once),
        sum(r.completion_tokens for r in results),
        sum(r.cached_tokens for r in prompts_once),
    )


class Spelling:
    """Token ids -> the text OpenAI's logprobs name them by (cached: the vocabulary does not change)."""

    def __init__(self, tokenizer):
        self._tokenizer = tokenizer
        self._cache: dict[int, str] = {}

    def __call__(self, token_id: int) -> str:
        text = self._cache.get(token_id)
        if text is None:
            text = self._cache[token_id] = self._tokenizer.token_bytes(token_id).decode("utf-8", errors="replace")
        return text

    def bytes(self, token_id: int) -> list[int]:
        return list(self._tokenizer.token_bytes(token_id))


class CompletionLogprobs:
    """The completions `logprobs` object of one choice, built up token by token: `tokens`,
    `token_logprobs`, `top_logprobs` (the N most likely plus the sampled token, by text) and
    `text_offset` (each token's character offset in the choice's text)."""

    def __init__(self, spell: Spelling, offset: int = 0):
        self.spell, self.offset = spell, offset

    def add(self, token_ids, logprobs, tops, first_unscored: bool = False) -> dict:
        """The object for these tokens alone (a stream chunk's); `first_unscored`: the first token is
        the prompt's first, which has no logprob and no alternatives."""
        out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        for i, token in enumerate(token_ids):
            text = self.spell(token)
            logprob = logprobs[i] if logprobs is not None and i < len(logprobs) else None
            top = None
            if not (first_unscored and i == 0):
                top = {self.spell(t): lp for t, lp in (tops[i] if tops and i < len(tops) else ())}
                if logprob is not None:
                    top.setdefault(text, logprob)
            out["tokens"].append(text)
            out["token_logprobs"].append(logprob)
            out["top_logprobs"].append(top)
            out["text_offset"].append(self.offset)
            self.offset += len(text)
        return out


def merge_completion_logprobs(parts: list[dict]) -> dict:
    return {
        key: [v for part in parts for v in part[key]]
        for key in ("tokens", "token_logprobs", "top_logprobs", "text_offset")
    }


def chat_logprobs(spell: Spelling, token_ids, logprobs, tops) -> dict:
    """The chat `logprobs` object: `content`, one entry per token with its alternatives."""

    def entry(token, logprob):
        return {"token": spell(token), "logprob": logprob, "bytes": spell.bytes(token)}

    content = []
    for i, token in enumerate(token_ids):
        logprob = logprobs[i] if logprobs is not None and i < len(logprobs) else None
        alternatives = tops[i] if tops and i < len(tops) else ()
        content.append({**entry(token, logprob), "top_logprobs": [entry(t, lp) for t, lp in alternatives]})
    return {"content": content}


def completion(request_id: str, model: str, choices: list[dict], usage_: dict) -> dict:
    return {
        "id": request_id,
        "object": "text_completion",
        "created": int(time.time()),
        "model": model,
        "choices": choices,
        "usage": usage_,
    }


def completion_choice(index: int, text: str, logprobs: dict | None, finish_reason: str | None) -> dict:
    return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}


def chat_completion(request_id: str, model: str, choices: list[dict], usage_: dict) -> dict:
    return {
        "id": request_id,
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": choices,
        "usage": usage_,
    }


def chat_choice(index: int, text: str, logprobs: dict | None, finish_reason: str) -> dict:
    return {
        "index": index,
        "message": {"role": "assistant", "content": text},
        "logprobs": logprobs,
        "finish_reason": finish_reason,
    }


def chunk(request_id: str, model: str, obj: str, choices: list[dict], include_usage: bool, usage_=None) -> dict:
    """One stream chunk (`obj`: text_completion or chat.completion.chunk); with `include_usage` every chunk
    has a `usage` key, null but in the last one (whose choices are empty), as OpenAI streams it."""
    out = {"id": request_id, "object": obj, "created": int(time.time()), "model": model, "choices": choices}
    if include_usage:
        out["usage"] = usage_
    return out


def chat_delta(index: int, delta: dict, logprobs: dict | None = None, finish_reason: str | None = None) -> dict:
    return {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}
