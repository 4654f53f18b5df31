"""SentencePiece vocabularies: `.model` files encoded by the `sentencepiece` library, and llama2.c's
score-ordered BPE for `▁`-spelled vocabularies with scores (GGUF "llama", llama2.c `.bin`).
"""

from __future__ import annotations

import heapq
import re
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import sentencepiece

from jaxinfer.tokenizer.base import (
    _BYTE,
    _BYTE_PIECE,
    _CONTROL,
    _NORMAL,
    _SPACE,
    _UNKNOWN,
    _USER_DEFINED,
    Tokenizer,
    TokenizerError,
    _config_token,
    _extra_eos_ids,
    _sentencepiece_bytes,
)
from jaxinfer.tokenizer.chat import _config_template


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

    def __init__(
        self,
        mergeable: dict[str, int],
        scores: Sequence[float],
        byte_ids: dict[int, int],
        unk_id: int | None,
        add_space_prefix: bool,
    ):
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


def _scored_bpe_tokenizer(
    source: str,
    pieces: list[str],
    scores: list[float],
    types: list[int],
    *,
    add_space_prefix: bool,
    bos_id: int | None,
    eos_ids: Iterable[int],
    pad_id: int | None,
    uses_bos: bool,
    chat_template: str | None,
) -> Tokenizer:
    """A Tokenizer over a `▁`-spelled SentencePiece vocabulary with scores (GGUF "llama", llama2.c .bin)."""
    byte_ids = {
        int(m[1], 16): i
        for i, p in enumerate(pieces)
        if types[i] in (_BYTE, _NORMAL) and (m := _BYTE_PIECE.fullmatch(p))
    }
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
        source=source,
        pieces=pieces,
        token_bytes=[_sentencepiece_bytes(p) for p in pieces],
        encode_text=_SpecialSplitter(specials, encoder),
        special_ids=special_ids,
        byte_ids=byte_token_ids,
        strip_leading_space=add_space_prefix,
        bos_id=bos_id,
        eos_ids=eos_ids,
        pad_id=pad_id,
        uses_bos=uses_bos,
        chat_template=chat_template,
    )


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
        source=str(path),
        pieces=pieces,
        token_bytes=[p.encode() if i in special_ids else _sentencepiece_bytes(p) for i, p in enumerate(pieces)],
        encode_text=_SpecialSplitter(controls, sp.encode),
        special_ids=special_ids,
        byte_ids=byte_ids,
        strip_leading_space=has_dummy_prefix,
        bos_id=lookup("bos_token", sp.bos_id()),
        eos_ids=[lookup("eos_token", sp.eos_id())] + _extra_eos_ids(config),
        pad_id=lookup("pad_token", sp.pad_id()),
        uses_bos=bool(config.get("add_bos_token", True)),
        chat_template=_config_template(config),
    )
