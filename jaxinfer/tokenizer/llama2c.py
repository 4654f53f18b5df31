"""llama2.c's `tokenizer.bin`, encoded with llama2.c's own score-ordered merge algorithm."""

from __future__ import annotations

import math
import struct
from pathlib import Path

from jaxinfer.tokenizer.base import (
    _BYTE,
    _BYTE_PIECE,
    _CONTROL,
    _NORMAL,
    _SPACE,
    _UNKNOWN,
    Tokenizer,
    TokenizerError,
    _read_bytes,
)
from jaxinfer.tokenizer.spm import _scored_bpe_tokenizer


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
            pieces.append(data[offset : offset + length].decode("utf-8").replace(" ", _SPACE))
        except UnicodeDecodeError:
            raise TokenizerError(f"{path}: not a llama2.c tokenizer (token {len(pieces)} is not UTF-8)") from None
        scores.append(score)
        offset += length
    if len(pieces) < 3:
        raise TokenizerError(f"{path}: not a llama2.c tokenizer (only {len(pieces)} tokens)")
    pieces[:3] = ["<unk>", "<s>", "</s>"]
    types = [_UNKNOWN, _CONTROL, _CONTROL] + [_BYTE if _BYTE_PIECE.fullmatch(p) else _NORMAL for p in pieces[3:]]
    return _scored_bpe_tokenizer(
        str(path),
        pieces,
        scores,
        types,
        add_space_prefix=True,
        bos_id=1,
        eos_ids=[2],
        pad_id=None,
        uses_bos=True,
        chat_template=None,
    )
