"""Hugging Face `tokenizer.json` files, encoded by the `tokenizers` library and decoded by the rule
(byte-level BPE or SentencePiece-style) their decoder names.
"""

from __future__ import annotations

import json
from pathlib import Path

import tokenizers

from jaxinfer.tokenizer.base import (
    _BYTE_PIECE,
    _SPACE,
    Tokenizer,
    TokenizerError,
    _byte_level_bytes,
    _config_token,
    _extra_eos_ids,
    _read_json,
    _sentencepiece_bytes,
)
from jaxinfer.tokenizer.chat import _config_template


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
        source=str(path),
        pieces=pieces,
        token_bytes=token_bytes,
        encode_text=lambda text: backend.encode(text, add_special_tokens=False).ids,
        special_ids=[i for i, token in added.items() if token.special],
        byte_ids=byte_ids,
        strip_leading_space=strip_leading_space,
        bos_id=backend.token_to_id(bos_text) if bos_text else None,
        eos_ids=[backend.token_to_id(eos_text) if eos_text else None] + _extra_eos_ids(config),
        pad_id=backend.token_to_id(pad_text) if pad_text else None,
        uses_bos=bool(uses_bos),
        chat_template=_config_template(config),
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
