"""The one request builder: text, chat messages or token ids plus sampling parameters -> a validated
engine `Request`. The batch job and the gRPC service build every request here (so will HTTP), and
nothing after it validates again. A bad field is a `RequestError` naming the field, the value and
the limit; `where` prefixes it with the place (a JSONL line, a prompt number, `params.`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from jaxinfer.engine.config import EngineConfig
from jaxinfer.engine.requests import Request, RequestError, SamplingParams
from jaxinfer.tokenizer import TokenizerError


class RequestBuilder:
    """Builds requests for an engine with `config`'s limits over a vocabulary of `vocab_size` tokens;
    `head_vocab` > 0: the model is a reduced-head draft (`ModelConfig.head_vocab`), which has no prompt
    logprobs (its engine step gets no full-vocabulary head to compute them with, `Llama._reduced_head`)."""

    def __init__(self, tokenizer, config: EngineConfig, vocab_size: int, head_vocab: int = 0):
        self.tokenizer, self.config, self.vocab_size, self.head_vocab = tokenizer, config, vocab_size, head_vocab

    @classmethod
    def for_engine(cls, engine) -> RequestBuilder:
        c = engine.model.config
        return cls(engine.tokenizer, engine.config, c.vocab_size, c.head_vocab)

    def params(self, raw: SamplingParams | Mapping[str, Any], where: str = "") -> SamplingParams:
        """Sampling parameters from a dict (unknown keys refused) or as given, checked against the limits."""
        params = raw if isinstance(raw, SamplingParams) else SamplingParams.from_dict(raw, where=where)
        params.validate(max_tokens_limit=self.config.max_context, vocab_size=self.vocab_size, where=where)
        if self.head_vocab and params.prompt_logprobs is not None:
            raise RequestError(
                f"{where}prompt_logprobs={params.prompt_logprobs!r}: not available from a draft model with a "
                f"reduced head (head_vocab {self.head_vocab} of {self.vocab_size} ids); ask its target"
            )
        return params

    def build(
        self,
        request_id: str,
        *,
        text: str | None = None,
        messages: Sequence[Mapping] | None = None,
        token_ids: Sequence[int] | None = None,
        params: SamplingParams | Mapping[str, Any] = SamplingParams(),
        chat: bool = False,
        truncate: bool = False,
        where: str = "",
        params_where: str = "",
        text_field: str = "text",
        truncate_hint: str = "",
    ) -> Request:
        """Exactly one of `text` (rendered with the chat template when `chat`), `messages` or `token_ids`.

        An over-long prompt is refused (its message ends with `truncate_hint`), or with `truncate` cut
        to its last tokens. `text_field` is what the protocol calls the text prompt.
        """
        source, ids = self.encode(
            text=text, messages=messages, token_ids=token_ids, chat=chat, where=where, text_field=text_field
        )
        limit = self.config.max_prompt_tokens
        if not ids:
            raise RequestError(f"{where}{source}: the prompt is empty")
        if len(ids) > limit:
            if not truncate:
                raise RequestError(
                    f"{where}{source}: the prompt is {len(ids)} tokens, above the limit of {limit} "
                    f"(max context {self.config.max_context} minus 1 for the first output token)" + truncate_hint
                )
            ids = ids[-limit:]
        vocab = self.vocab_size
        bad = next((t for t in ids if not 0 <= t < vocab), None)
        if bad is not None:
            raise RequestError(f"{where}token_ids contains {bad}, outside the vocabulary [0, {vocab})")
        return Request(request_id, ids, self.params(params, where + params_where))

    def encode(
        self, *, text=None, messages=None, token_ids=None, chat: bool = False, where: str = "", text_field: str = "text"
    ) -> tuple[str, list[int]]:
        """(the field that held the prompt, its token ids), with no length limit (Tokenize uses this)."""
        given = [
            name
            for name, value in ((text_field, text), ("messages", messages), ("token_ids", token_ids))
            if value is not None
        ]
        if not given:
            raise RequestError(f"{where}the prompt is empty: set one of {text_field}, messages or token_ids")
        if len(given) > 1:
            raise RequestError(f"{where}set only one of {text_field}, messages or token_ids, not {' and '.join(given)}")
        return given[0], self._encode(
            "text" if given[0] == text_field else given[0], text, messages, token_ids, chat, where, text_field
        )

    def _encode(self, source, text, messages, token_ids, chat: bool, where: str, text_field: str) -> list[int]:
        tok = self.tokenizer
        if source == "token_ids":
            if any(not isinstance(t, int) or isinstance(t, bool) for t in token_ids):
                raise RequestError(f"{where}token_ids must be integers")
            return list(token_ids)
        if source == "text":
            if not isinstance(text, str):
                raise RequestError(f"{where}{text_field} must be a string, got {type(text).__name__}")
            if not text:
                raise RequestError(f"{where}{text_field} is empty")
            return tok.encode_chat([{"role": "user", "content": text}]) if chat else tok.encode(text)
        if not tok.has_chat_template:
            raise RequestError(f"{where}messages: this model has no chat template; send text or token_ids instead")
        try:
            return tok.encode_chat(list(messages))
        except TokenizerError as e:
            raise RequestError(f"{where}messages: {e}") from None
