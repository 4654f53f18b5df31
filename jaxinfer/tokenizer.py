"""Tokenizers: one `Tokenizer` interface over every vocabulary format a Llama-class checkpoint ships with.

`load_tokenizer(path)` accepts:

- a Hugging Face directory holding `tokenizer.json` (preferred) or `tokenizer.model`, plus the optional
  `tokenizer_config.json` (chat template, BOS/EOS/pad tokens, `add_bos_token`), `chat_template.jinja`
  and `generation_config.json` (further end-of-generation ids);
- a `tokenizer.json` file, encoded by the `tokenizers` library;
- a SentencePiece `.model` file, encoded by the `sentencepiece` library;
- a `.gguf` file with the vocabulary in its metadata, read with `gguf.GGUFReader`: byte-level BPE
  (`tokenizer.ggml.model` "gpt2", rebuilt with `tokenizers` using the pre-tokenizer regexes llama.cpp
  uses for `tokenizer.ggml.pre`) or SentencePiece-style (`"llama"`, score-ordered merges);
- a llama2.c `tokenizer.bin`, encoded with llama2.c's own score-ordered merge algorithm.

Encoding is left to each format's backend, but decoding is done here: every id is mapped once to the
bytes it stands for, so `decode` and `StreamingDetokenizer` are the same code path, and a stream never
emits half of a UTF-8 character. Special tokens written in the text (such as `<|im_start|>` in a
rendered chat template) always encode as their single id.

Every user mistake (missing path, unknown format, corrupt file, bad chat message) raises
`TokenizerError` with a one-line message naming the file and the problem.
"""

from __future__ import annotations

import codecs
import datetime
import functools
import heapq
import json
import math
import os
import re
import struct
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import gguf
import jinja2
import jinja2.ext
import jinja2.sandbox
import sentencepiece
import tokenizers
from tokenizers import AddedToken, Regex, models, pre_tokenizers

__all__ = ["StreamingDetokenizer", "Tokenizer", "TokenizerError", "load_tokenizer"]


class TokenizerError(ValueError):
    """A tokenizer file that cannot be used, or a request the tokenizer cannot serve."""


# Texts of special tokens that end a turn or a document; llama.cpp treats the same set as end-of-generation.
_END_OF_GENERATION = frozenset({
    "</s>", "<|endoftext|>", "<|end_of_text|>", "<|eot_id|>", "<|eom_id|>", "<|im_end|>", "<|end|>",
    "<end_of_turn>", "<EOT>", "<|return|>", "<|call|>", "<｜end▁of▁sentence｜>",
})

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


def _validate_messages(messages: list[dict]) -> None:
    """Reject a conversation the template could only render wrongly, naming the bad field."""
    if not isinstance(messages, (list, tuple)):
        raise TokenizerError(f"messages must be a list of dicts, got {type(messages).__name__}")
    for index, message in enumerate(messages):
        if not isinstance(message, dict):
            raise TokenizerError(f"messages[{index}] must be a dict, got {type(message).__name__}")
        for field in ("role", "content"):
            if field not in message:
                raise TokenizerError(f"messages[{index}] has no {field!r}")
            if not isinstance(message[field], str):
                raise TokenizerError(f"messages[{index}][{field!r}] must be a str, got {type(message[field]).__name__}")


@functools.cache
def _jinja_environment() -> jinja2.Environment:
    """A sandbox set up like transformers' chat-template environment, so templates render the same."""

    def raise_exception(message: str):
        raise jinja2.TemplateError(message)

    def tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = jinja2.sandbox.ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
    return env


# ---------------------------------------------------------------------------------------------------------------
# Encoders
# ---------------------------------------------------------------------------------------------------------------


class _SpecialSplitter:
    """Cuts special-token texts out of the input and encodes the rest with `encode_fragment`.

    Like llama.cpp, each text fragment is encoded on its own, so a SentencePiece dummy-prefix space
    goes at the start of the text and after every special token (as Meta's Llama 2 chat reference does).
    """

    def __init__(self, specials: dict[str, int], encode_fragment: Callable[[str], list[int]]):
        self._specials = specials
        self._encode_fragment = encode_fragment
        texts = sorted((t for t in specials if t), key=len, reverse=True)
        self._pattern = re.compile("(" + "|".join(map(re.escape, texts)) + ")") if texts else None

    def __call__(self, text: str) -> list[int]:
        if self._pattern is None:
            return self._encode_fragment(text)
        ids: list[int] = []
        for n, part in enumerate(self._pattern.split(text)):
            ids += [self._specials[part]] if n % 2 else self._encode_fragment(part)
        return ids


class _ScoredBpe:
    """SentencePiece-style BPE as llama2.c's run.c (and llama.cpp) encode it.

    Prepend a dummy-prefix space to non-empty text, spell spaces as `▁`, start from single characters
    (a character missing from the vocabulary becomes its UTF-8 bytes' `<0xNN>` tokens), then keep merging
    the adjacent pair whose merged piece scores highest, leftmost first on ties. A heap makes this
    O(n log n) rather than run.c's O(n^2) rescans; the merges chosen are the same.
    """

    def __init__(self, mergeable: dict[str, int], scores: Sequence[float], byte_ids: dict[int, int],
                 unk_id: int | None, add_space_prefix: bool):
        self._ids = mergeable
        self._scores = scores
        self._byte_ids = byte_ids
        self._unk_id = unk_id
        self._add_space_prefix = add_space_prefix

    def __call__(self, text: str) -> list[int]:
        if not text:
            return []
        if self._add_space_prefix:
            text = " " + text
        symbols = list(text.replace(" ", _SPACE))
        nxt = list(range(1, len(symbols))) + [-1]
        prv = list(range(-1, len(symbols) - 1))
        heap: list[tuple[float, int, str, str]] = []

        def push(left: int) -> None:
            right = nxt[left]
            if right < 0 or symbols[left] not in self._ids or symbols[right] not in self._ids:
                return  # a character without a token is byte fallback, which never merges
            merged_id = self._ids.get(symbols[left] + symbols[right])
            if merged_id is not None:
                heapq.heappush(heap, (-self._scores[merged_id], left, symbols[left], symbols[right]))

        for i in range(len(symbols) - 1):
            push(i)
        while heap:
            _, left, left_text, right_text = heapq.heappop(heap)
            right = nxt[left]
            if symbols[left] != left_text or right < 0 or symbols[right] != right_text:
                continue  # stale: one side has been merged since this pair was queued
            symbols[left] += symbols[right]
            symbols[right] = ""
            nxt[left] = nxt[right]
            if nxt[left] >= 0:
                prv[nxt[left]] = left
            if prv[left] >= 0:
                push(prv[left])
            push(left)

        ids: list[int] = []
        for symbol in filter(None, symbols):
            if symbol in self._ids:
                ids.append(self._ids[symbol])
            elif all(b in self._byte_ids for b in symbol.encode()):
                ids += [self._byte_ids[b] for b in symbol.encode()]
            elif self._unk_id is not None:
                ids.append(self._unk_id)
            else:
                raise TokenizerError(f"cannot encode {symbol!r}: no token, no byte-fallback tokens and no <unk>")
        return ids


def _scored_bpe_tokenizer(source: str, pieces: list[str], scores: list[float], types: list[int], *,
                          add_space_prefix: bool, bos_id: int | None, eos_ids: Iterable[int], pad_id: int | None,
                          uses_bos: bool, chat_template: str | None) -> Tokenizer:
    """A Tokenizer over a `▁`-spelled SentencePiece vocabulary with scores (GGUF "llama", llama2.c .bin)."""
    byte_ids = {int(m[1], 16): i for i, p in enumerate(pieces)
                if types[i] in (_BYTE, _NORMAL) and (m := _BYTE_PIECE.fullmatch(p))}
    byte_token_ids = set(byte_ids.values())
    mergeable: dict[str, int] = {}
    for i, piece in enumerate(pieces):
        if types[i] in (_NORMAL, _USER_DEFINED) and i not in byte_token_ids:
            mergeable.setdefault(piece, i)
    unk_id = next((i for i, t in enumerate(types) if t == _UNKNOWN), None)
    special_ids = [i for i, t in enumerate(types) if t in (_CONTROL, _UNKNOWN)]
    specials = {pieces[i]: i for i, t in enumerate(types) if t in (_CONTROL, _USER_DEFINED)}
    encoder = _ScoredBpe(mergeable, scores, byte_ids, unk_id, add_space_prefix)
    return Tokenizer(
        source=source, pieces=pieces, token_bytes=[_sentencepiece_bytes(p) for p in pieces],
        encode_text=_SpecialSplitter(specials, encoder), special_ids=special_ids, byte_ids=byte_token_ids,
        strip_leading_space=add_space_prefix, bos_id=bos_id, eos_ids=eos_ids, pad_id=pad_id,
        uses_bos=uses_bos, chat_template=chat_template,
    )


# ---------------------------------------------------------------------------------------------------------------
# Loaders
# ---------------------------------------------------------------------------------------------------------------


def load_tokenizer(path: str | os.PathLike) -> Tokenizer:
    """Load the tokenizer at `path`: a Hugging Face directory, `tokenizer.json`, SentencePiece `.model`,
    `.gguf` or llama2.c `.bin` (see the module docstring). Raises TokenizerError naming the path on failure."""
    path = Path(path)
    if path.is_dir():
        return _load_directory(path)
    if not path.is_file():
        raise TokenizerError(f"{path}: no such file or directory")
    if _read_bytes(path, 4) == b"GGUF":
        return _load_gguf(path)
    if path.suffix.lower() == ".gguf":
        raise TokenizerError(f"{path}: not a GGUF file (no GGUF magic at the start)")
    if path.suffix.lower() == ".json":
        return _load_tokenizer_json(path, {})
    if ".model" in (s.lower() for s in path.suffixes):
        return _load_sentencepiece(path, {})
    if path.suffix.lower() == ".bin":
        return _load_llama2c(path)
    raise TokenizerError(
        f"{path}: unrecognised tokenizer format (expected a directory, .gguf, .json, SentencePiece .model "
        "or llama2.c .bin)"
    )


def _load_directory(path: Path) -> Tokenizer:
    """A Hugging Face model directory: tokenizer.json or tokenizer.model, plus the optional config files."""
    config = _read_json(path / "tokenizer_config.json") if (path / "tokenizer_config.json").is_file() else {}
    template_file = path / "chat_template.jinja"
    if template_file.is_file():
        config["chat_template"] = _read_bytes(template_file).decode("utf-8", errors="replace")
    if (path / "generation_config.json").is_file():
        config["generation_eos_token_id"] = _read_json(path / "generation_config.json").get("eos_token_id")
    if (path / "tokenizer.json").is_file():
        return _load_tokenizer_json(path / "tokenizer.json", config)
    if (path / "tokenizer.model").is_file():
        return _load_sentencepiece(path / "tokenizer.model", config)
    raise TokenizerError(f"{path}: directory holds neither tokenizer.json nor tokenizer.model")


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


def _config_template(config: dict) -> str | None:
    """tokenizer_config.json's chat template: a string, or a list of named templates ("default" wins)."""
    template = config.get("chat_template")
    if isinstance(template, list):
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    return template if isinstance(template, str) else None


def _load_tokenizer_json(path: Path, config: dict) -> Tokenizer:
    """A Hugging Face `tokenizer.json`: encoded by `tokenizers`, decoded by the rule its decoder names."""
    spec = _read_json(path)
    try:
        backend = tokenizers.Tokenizer.from_str(json.dumps(spec))
    except Exception as exc:  # tokenizers raises a bare Exception for every malformed file
        raise TokenizerError(f"{path}: not a tokenizers JSON file ({exc})") from None
    byte_level, strip_leading_space = _decoder_rules(path, spec.get("decoder"))
    vocab_size = backend.get_vocab_size(with_added_tokens=True)
    pieces = [backend.id_to_token(i) or "" for i in range(vocab_size)]
    added = backend.get_added_tokens_decoder()
    to_bytes = _byte_level_bytes if byte_level else _sentencepiece_bytes
    token_bytes = [added[i].content.encode() if i in added else to_bytes(p) for i, p in enumerate(pieces)]
    byte_ids = [] if byte_level else [i for i, p in enumerate(pieces) if i not in added and _BYTE_PIECE.fullmatch(p)]

    template_bos = _post_processor_bos(spec.get("post_processor"))
    bos_text = _config_token(config, "bos_token") if "bos_token" in config else template_bos
    uses_bos = config.get("add_bos_token", template_bos is not None)
    eos_text, pad_text = _config_token(config, "eos_token"), _config_token(config, "pad_token")
    return Tokenizer(
        source=str(path), pieces=pieces, token_bytes=token_bytes,
        encode_text=lambda text: backend.encode(text, add_special_tokens=False).ids,
        special_ids=[i for i, token in added.items() if token.special], byte_ids=byte_ids,
        strip_leading_space=strip_leading_space,
        bos_id=backend.token_to_id(bos_text) if bos_text else None,
        eos_ids=[backend.token_to_id(eos_text) if eos_text else None] + _extra_eos_ids(config),
        pad_id=backend.token_to_id(pad_text) if pad_text else None,
        uses_bos=bool(uses_bos), chat_template=_config_template(config),
    )


def _decoder_rules(path: Path, decoder: dict | None) -> tuple[bool, bool]:
    """`(byte_level, strip_leading_space)` from a tokenizer.json decoder: byte-level BPE or SentencePiece."""
    steps = decoder.get("decoders", [decoder]) if isinstance(decoder, dict) else []
    kinds = {step.get("type"): step for step in steps}
    if "ByteLevel" in kinds:
        return True, False
    if "Metaspace" in kinds:
        metaspace = kinds["Metaspace"]
        return False, metaspace.get("prepend_scheme", "always") != "never" and metaspace.get("add_prefix_space", True)
    if any(step.get("type") == "Replace" and step.get("pattern", {}).get("String") == _SPACE for step in steps):
        return False, any(step.get("type") == "Strip" and step.get("start", 0) > 0 for step in steps)
    found = sorted(k for k in kinds if k) or ["none"]
    raise TokenizerError(f"{path}: unsupported decoder {'+'.join(found)} (need ByteLevel or SentencePiece-style)")


def _post_processor_bos(processor: dict | None) -> str | None:
    """The special token a tokenizer.json post-processor puts first in every sequence, if any."""
    steps = processor.get("processors", [processor]) if isinstance(processor, dict) else []
    for step in steps:
        if step.get("type") == "TemplateProcessing" and step.get("single"):
            first = step["single"][0]
            return first["SpecialToken"]["id"] if "SpecialToken" in first else None
    return None


def _load_sentencepiece(path: Path, config: dict) -> Tokenizer:
    """A SentencePiece model file, encoded by the `sentencepiece` library itself."""
    try:
        sp = sentencepiece.SentencePieceProcessor(model_file=str(path))
    except (RuntimeError, OSError):
        raise TokenizerError(f"{path}: not a SentencePiece model (cannot parse the ModelProto)") from None
    n = sp.get_piece_size()
    pieces = [sp.id_to_piece(i) for i in range(n)]
    special_ids = {i for i in range(n) if sp.is_control(i) or sp.is_unknown(i)}
    byte_ids = [i for i in range(n) if sp.is_byte(i)]
    controls = {pieces[i]: i for i in range(n) if sp.is_control(i)}
    has_dummy_prefix = sp.encode("a", out_type=str)[0].startswith(_SPACE)

    def lookup(key: str, default: int) -> int | None:
        text = _config_token(config, key)
        token_id = sp.piece_to_id(text) if text else default
        return token_id if token_id >= 0 else None

    return Tokenizer(
        source=str(path), pieces=pieces,
        token_bytes=[p.encode() if i in special_ids else _sentencepiece_bytes(p) for i, p in enumerate(pieces)],
        encode_text=_SpecialSplitter(controls, sp.encode), special_ids=special_ids, byte_ids=byte_ids,
        strip_leading_space=has_dummy_prefix,
        bos_id=lookup("bos_token", sp.bos_id()),
        eos_ids=[lookup("eos_token", sp.eos_id())] + _extra_eos_ids(config),
        pad_id=lookup("pad_token", sp.pad_id()),
        uses_bos=bool(config.get("add_bos_token", True)), chat_template=_config_template(config),
    )


def _load_llama2c(path: Path) -> Tokenizer:
    """llama2.c's tokenizer.bin: int32 max_token_length, then per token float32 score, int32 length, bytes.

    Tokens 0, 1, 2 are <unk>, <s>, </s> (the file spells BOS/EOS with newlines around them); the file
    writes spaces as real spaces, which are respelled `▁` here so one SentencePiece path serves all.
    """
    data = _read_bytes(path)
    if len(data) < 4:
        raise TokenizerError(f"{path}: not a llama2.c tokenizer (file too short)")
    (max_length,) = struct.unpack_from("<i", data)
    if not 0 < max_length <= 4096:
        raise TokenizerError(f"{path}: not a llama2.c tokenizer (implausible max token length {max_length})")
    pieces, scores, offset = [], [], 4
    while offset < len(data):
        if offset + 8 > len(data):
            raise TokenizerError(f"{path}: truncated llama2.c tokenizer (token {len(pieces)} cut short)")
        score, length = struct.unpack_from("<fi", data, offset)
        offset += 8
        if not (0 <= length <= max_length and offset + length <= len(data) and math.isfinite(score)):
            raise TokenizerError(f"{path}: not a llama2.c tokenizer (bad record for token {len(pieces)})")
        try:
            pieces.append(data[offset:offset + length].decode("utf-8").replace(" ", _SPACE))
        except UnicodeDecodeError:
            raise TokenizerError(f"{path}: not a llama2.c tokenizer (token {len(pieces)} is not UTF-8)") from None
        scores.append(score)
        offset += length
    if len(pieces) < 3:
        raise TokenizerError(f"{path}: not a llama2.c tokenizer (only {len(pieces)} tokens)")
    pieces[:3] = ["<unk>", "<s>", "</s>"]
    types = [_UNKNOWN, _CONTROL, _CONTROL] + [_BYTE if _BYTE_PIECE.fullmatch(p) else _NORMAL for p in pieces[3:]]
    return _scored_bpe_tokenizer(str(path), pieces, scores, types, add_space_prefix=True, bos_id=1, eos_ids=[2],
                                 pad_id=None, uses_bos=True, chat_template=None)


# Pre-tokenizer regexes per `tokenizer.ggml.pre`, copied from llama.cpp's llm_tokenizer_bpe; each is applied
# in turn, keeping matches and the text between them as separate pieces.
_GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_PRE_TOKENIZERS: dict[str, tuple[tuple[str, ...], bool]] = {  # flavour -> (regexes, ignore_merges)
    **dict.fromkeys(["default", "gpt2", "mpt", "olmo", "jais"], ((_GPT2_SPLIT,), False)),
    **dict.fromkeys(["smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva"],
                    ((r"\p{N}", _GPT2_SPLIT), False)),
    **dict.fromkeys(["llama3", "llama-bpe", "llama-v3", "dbrx", "smaug-bpe", "falcon3", "pixtral"],
                    ((_LLAMA3_SPLIT,), True)),
    **dict.fromkeys(["qwen2", "deepseek-r1-qwen", "stablelm2"], ((_QWEN2_SPLIT,), False)),
}


def _load_gguf(path: Path) -> Tokenizer:
    """The vocabulary embedded in a GGUF file's metadata (llama.cpp's `tokenizer.*` keys)."""
    try:
        reader = gguf.GGUFReader(path)
    except Exception as exc:  # gguf raises ValueError, IndexError, struct and numpy errors alike
        raise TokenizerError(f"{path}: corrupt or truncated GGUF file ({type(exc).__name__}: {exc})") from None

    def field(key: str, default=None, required: bool = False):
        value = reader.get_field(key)
        if value is None:
            if required:
                raise TokenizerError(f"{path}: GGUF metadata has no {key!r}")
            return default
        return value.contents()

    model = field("tokenizer.ggml.model", required=True)
    tokens = field("tokenizer.ggml.tokens", required=True)
    types = field("tokenizer.ggml.token_type") or [_NORMAL] * len(tokens)
    bos_id = field("tokenizer.ggml.bos_token_id")
    eos_ids = [field(f"tokenizer.ggml.{k}_token_id") for k in ("eos", "eot", "eom")]
    pad_id = field("tokenizer.ggml.padding_token_id")
    template = field("tokenizer.chat_template")
    if len(types) != len(tokens):
        raise TokenizerError(f"{path}: tokenizer.ggml.token_type has {len(types)} entries for {len(tokens)} tokens")
    if model == "llama":
        scores = field("tokenizer.ggml.scores", required=True)
        if len(scores) != len(tokens):
            raise TokenizerError(f"{path}: tokenizer.ggml.scores has {len(scores)} entries for {len(tokens)} tokens")
        return _scored_bpe_tokenizer(
            str(path), tokens, scores, types, add_space_prefix=field("tokenizer.ggml.add_space_prefix", True),
            bos_id=bos_id, eos_ids=eos_ids, pad_id=pad_id,
            uses_bos=field("tokenizer.ggml.add_bos_token", True), chat_template=template,
        )
    if model == "gpt2":
        encoder = _byte_level_bpe(path, tokens, field("tokenizer.ggml.merges", required=True), types,
                                  field("tokenizer.ggml.pre", "default"))
        literal = {i for i, t in enumerate(types) if t in (_CONTROL, _USER_DEFINED)}
        return Tokenizer(
            source=str(path), pieces=tokens,
            token_bytes=[p.encode() if i in literal else _byte_level_bytes(p) for i, p in enumerate(tokens)],
            encode_text=encoder, special_ids=[i for i, t in enumerate(types) if t in (_CONTROL, _UNKNOWN)],
            bos_id=bos_id, eos_ids=eos_ids, pad_id=pad_id,
            uses_bos=field("tokenizer.ggml.add_bos_token", False), chat_template=template,
        )
    raise TokenizerError(f"{path}: unsupported GGUF tokenizer model {model!r} (supported: 'gpt2', 'llama')")


def _byte_level_bpe(path: Path, tokens: list[str], merges: list[str], types: list[int],
                    flavour: str) -> Callable[[str], list[int]]:
    """Rebuild a GGUF byte-level BPE vocabulary as a `tokenizers` encoder with llama.cpp's pre-tokenizer."""
    if flavour not in _PRE_TOKENIZERS:
        raise TokenizerError(
            f"{path}: unsupported pre-tokenizer {flavour!r} (tokenizer.ggml.pre); supported: {sorted(_PRE_TOKENIZERS)}"
        )
    splits, ignore_merges = _PRE_TOKENIZERS[flavour]
    vocab: dict[str, int] = {}
    for i, token in enumerate(tokens):
        vocab.setdefault(token, i)
    try:
        bpe = models.BPE(vocab=vocab, merges=[tuple(m.split(" ", 1)) for m in merges], ignore_merges=ignore_merges)
    except Exception as exc:  # tokenizers raises a bare Exception for inconsistent merges
        raise TokenizerError(f"{path}: GGUF vocabulary and merges do not fit together ({exc})") from None
    backend = tokenizers.Tokenizer(bpe)
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(r), behavior="isolated") for r in splits]
        + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
    )
    backend.add_special_tokens(
        [AddedToken(t, special=True, normalized=False) for t, k in zip(tokens, types) if k == _CONTROL]
    )
    backend.add_tokens(
        [AddedToken(t, special=False, normalized=False) for t, k in zip(tokens, types) if k == _USER_DEFINED]
    )
    return lambda text: backend.encode(text, add_special_tokens=False).ids
