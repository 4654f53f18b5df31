"""The shared `Tokenizer` interface and `StreamingDetokenizer`, plus what every format module builds on:
token-type constants, the bytes a SentencePiece or byte-level BPE token stands for, and file/config readers.
"""

from __future__ import annotations

import codecs
import functools
import json
import re
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import jinja2

from jaxinfer.tokenizer.chat import _jinja_environment, _validate_messages
from jaxinfer.tokenizer.errors import TokenizerError

__all__ = ["StreamingDetokenizer", "Tokenizer", "TokenizerError"]


# Texts of special tokens that end a turn or a document; llama.cpp treats the same set as end-of-generation.
_END_OF_GENERATION = frozenset(
    {
        "</s>",
        "<|endoftext|>",
        "<|end_of_text|>",
        "<|eot_id|>",
        "<|eom_id|>",
        "<|im_end|>",
        "<|end|>",
        "<end_of_turn>",
        "<EOT>",
        "<|return|>",
        "<|call|>",
        "<｜end▁of▁sentence｜>",
    }
)

_BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")
_SPACE = "\u2581"  # SentencePiece's visible space, "▁"

# GGUF token types (llama.cpp's llama_token_type).
_NORMAL, _UNKNOWN, _CONTROL, _USER_DEFINED, _UNUSED, _BYTE = 1, 2, 3, 4, 5, 6


def _byte_level_alphabet() -> dict[str, int]:
    """GPT-2's table from printable characters back to bytes: each character of a byte-level token is one byte."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {chr(b): b for b in printable}
    shifted = (b for b in range(256) if b not in table.values())
    table.update({chr(256 + n): b for n, b in enumerate(shifted)})
    return table


_BYTE_LEVEL = _byte_level_alphabet()


def _byte_level_bytes(piece: str) -> bytes:
    """The bytes a byte-level BPE token stands for; a token spelled outside the alphabet is literal text."""
    if all(ch in _BYTE_LEVEL for ch in piece):
        return bytes(_BYTE_LEVEL[ch] for ch in piece)
    return piece.encode()


def _sentencepiece_bytes(piece: str) -> bytes:
    """The bytes a SentencePiece token stands for: `<0xNN>` is one raw byte, `▁` is a space."""
    match = _BYTE_PIECE.fullmatch(piece)
    return bytes([int(match[1], 16)]) if match else piece.replace(_SPACE, " ").encode()


# ---------------------------------------------------------------------------------------------------------------
# The public interface
# ---------------------------------------------------------------------------------------------------------------


class Tokenizer:
    """Text <-> token ids for one model, whatever file the vocabulary came from.

    Encoding is left to each format's backend, but decoding is done here: every id is mapped once to the
    bytes it stands for, so `decode` and `StreamingDetokenizer` are the same code path, and a stream never
    emits half of a UTF-8 character. Special tokens written in the text (such as `<|im_start|>` in a
    rendered chat template) always encode as their single id.

    Built by `load_tokenizer`; the constructor takes the pieces a loader extracted from its format.
    Attributes: `vocab_size`, `bos_id`, `eos_ids` (every id that ends generation), `pad_id`, `uses_bos`
    (whether `encode` prepends BOS by default), `chat_template` and `source` (the file it came from).
    """

    def __init__(
        self,
        *,
        source: str,
        pieces: Sequence[str],
        token_bytes: Sequence[bytes],
        encode_text: Callable[[str], list[int]],
        special_ids: Iterable[int],
        byte_ids: Iterable[int] = (),
        strip_leading_space: bool = False,
        bos_id: int | None = None,
        eos_ids: Iterable[int] = (),
        pad_id: int | None = None,
        uses_bos: bool = False,
        chat_template: str | None = None,
    ):
        self.source = source
        self.vocab_size = len(pieces)
        self._pieces = list(pieces)
        self._bytes = list(token_bytes)
        self._encode_text = encode_text
        configured = [i for i in eos_ids if i is not None]
        # BOS and EOS are skipped by decode even where a file does not mark them as control tokens.
        self._special_ids = frozenset(special_ids) | {i for i in [bos_id, *configured] if i is not None}
        self._byte_ids = frozenset(byte_ids)
        self._strip_leading_space = strip_leading_space
        self.bos_id = bos_id
        self.uses_bos = uses_bos and bos_id is not None
        self.pad_id = pad_id
        by_name = sorted(i for i in self._special_ids if self._pieces[i] in _END_OF_GENERATION)
        self.eos_ids = tuple(dict.fromkeys(configured + by_name))
        self.chat_template = chat_template

    def __repr__(self) -> str:
        return f"Tokenizer({self.source!r}, vocab_size={self.vocab_size}, bos_id={self.bos_id}, eos_ids={self.eos_ids})"

    # -- encoding ------------------------------------------------------------------------------------------------

    def encode(self, text: str, add_bos: bool = True) -> list[int]:
        """Token ids for `text`; BOS is prepended only if `add_bos` and the model uses one (`uses_bos`)."""
        if not isinstance(text, str):
            raise TokenizerError(f"encode() takes a str, got {type(text).__name__}")
        prefix = [self.bos_id] if add_bos and self.uses_bos else []
        return prefix + self._encode_text(text)

    # -- decoding ------------------------------------------------------------------------------------------------

    def id_to_piece(self, token_id: int) -> str:
        """The token as the vocabulary spells it, e.g. `▁Hello`, `Ġworld`, `<0x0A>` or `<|im_end|>`."""
        return self._pieces[self._checked(token_id)]

    def token_bytes(self, token_id: int) -> bytes:
        """The raw bytes the token stands for in decoded text (a byte-fallback token is a single byte)."""
        return self._bytes[self._checked(token_id)]

    def decode(self, ids: Sequence[int], skip_special: bool = True) -> str:
        """The text for `ids`; special tokens (BOS, EOS, control tokens) are left out when `skip_special`."""
        stream = self.detokenizer(skip_special)
        return "".join(stream.add(i) for i in ids) + stream.flush()

    def detokenizer(self, skip_special: bool = True) -> StreamingDetokenizer:
        """A fresh incremental decoder whose outputs concatenate to `decode(ids, skip_special)`."""
        return StreamingDetokenizer(self, skip_special)

    def _checked(self, token_id: int) -> int:
        token_id = int(token_id)
        if not 0 <= token_id < self.vocab_size:
            raise TokenizerError(
                f"token id {token_id} is outside the vocabulary of {self.source} (size {self.vocab_size})"
            )
        return token_id

    def _text_bytes(self, token_id: int, skip_special: bool, at_start: bool) -> bytes | None:
        """What `token_id` adds to decoded text, or None when it is skipped.

        SentencePiece vocabularies put a space before the first word (the "dummy prefix"); like the
        `sentencepiece` library, decoding drops it from the first token of the text.
        """
        token_id = self._checked(token_id)
        if skip_special and token_id in self._special_ids:
            return None
        data = self._bytes[token_id]
        if at_start and self._strip_leading_space and token_id not in self._byte_ids and data.startswith(b" "):
            data = data[1:]
        return data

    # -- chat ----------------------------------------------------------------------------------------------------

    @property
    def has_chat_template(self) -> bool:
        """Whether the vocabulary came with a chat template."""
        return bool(self.chat_template)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        """Render `messages` (dicts with string 'role' and 'content') with the model's Jinja chat template."""
        if not self.has_chat_template:
            raise TokenizerError(f"{self.source} has no chat template")
        _validate_messages(messages)
        special = {
            "bos_token": self.bos_id,
            "eos_token": self.eos_ids[0] if self.eos_ids else None,
            "pad_token": self.pad_id,
        }
        names = {name: self._pieces[i] if i is not None else "" for name, i in special.items()}
        try:
            return self._template.render(messages=messages, add_generation_prompt=add_generation_prompt, **names)
        except jinja2.TemplateError as exc:
            raise TokenizerError(f"chat template of {self.source} failed: {exc}") from None

    def encode_chat(self, messages: list[dict], add_generation_prompt: bool = True) -> list[int]:
        """Render and encode a conversation, adding BOS only when the model wants one and the template did not."""
        text = self.apply_chat_template(messages, add_generation_prompt)
        has_bos = self.bos_id is not None and text.startswith(self._pieces[self.bos_id])
        return self.encode(text, add_bos=not has_bos)

    @functools.cached_property
    def _template(self) -> jinja2.Template:
        try:
            return _jinja_environment().from_string(self.chat_template)
        except jinja2.TemplateError as exc:
            raise TokenizerError(f"chat template of {self.source} does not compile: {exc}") from None


class StreamingDetokenizer:
    """Turns generated ids into text as soon as the text is complete.

    `add` returns only whole characters: the bytes of a character split across tokens (byte-fallback
    tokens, or byte-level BPE pieces) are held back until its last byte arrives. `flush` returns what
    is left, with an incomplete trailing character as U+FFFD. The outputs of all `add` calls plus
    `flush` equal `tokenizer.decode(ids, skip_special)`, leading-space rules included.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special: bool = True):
        self._tokenizer = tokenizer
        self._skip_special = skip_special
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._at_start = True

    def add(self, token_id: int) -> str:
        """Feed one id; returns the text it completes (often "", never a partial character)."""
        data = self._tokenizer._text_bytes(token_id, self._skip_special, self._at_start)
        if data is None:
            return ""
        self._at_start = False
        return self._utf8.decode(data)

    def flush(self) -> str:
        """The text still held back, an unfinished character becoming U+FFFD."""
        return self._utf8.decode(b"", final=True)


# ---------------------------------------------------------------------------------------------------------------
# Reading files and tokenizer_config.json
# ---------------------------------------------------------------------------------------------------------------


def _read_bytes(path: Path, limit: int = -1) -> bytes:
    """The file's bytes (the first `limit` of them, if given), or a TokenizerError saying why not."""
    try:
        with path.open("rb") as f:
            return f.read(limit)
    except OSError as exc:
        raise TokenizerError(f"{path}: cannot read ({exc.strerror})") from None


def _read_json(path: Path) -> dict:
    try:
        value = json.loads(_read_bytes(path).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise TokenizerError(f"{path}: not readable JSON ({exc})") from None
    if not isinstance(value, dict):
        raise TokenizerError(f"{path}: expected a JSON object, got {type(value).__name__}")
    return value


def _config_token(config: dict, key: str) -> str | None:
    """A token named in tokenizer_config.json, written either as text or as an AddedToken dict."""
    value = config.get(key)
    return value.get("content") if isinstance(value, dict) else value


def _extra_eos_ids(config: dict) -> list[int]:
    """generation_config.json's `eos_token_id` (one id or a list), which often names more ids than the tokenizer."""
    ids = config.get("generation_eos_token_id")
    return [i for i in (ids if isinstance(ids, list) else [ids]) if isinstance(i, int)]
