"""`load_tokenizer(path)`: picks the format module from what `path` is (a Hugging Face directory, `tokenizer.json`,
SentencePiece `.model`, `.gguf` or llama2.c `.bin`) and returns its `Tokenizer`.
"""

from __future__ import annotations

import os
from pathlib import Path

from jaxinfer.tokenizer.base import Tokenizer, TokenizerError, _read_bytes, _read_json
from jaxinfer.tokenizer.gguf_vocab import _load_gguf
from jaxinfer.tokenizer.hf_json import _load_tokenizer_json
from jaxinfer.tokenizer.llama2c import _load_llama2c
from jaxinfer.tokenizer.spm import _load_sentencepiece


def load_tokenizer(path: str | os.PathLike) -> Tokenizer:
    """Load the tokenizer at `path`. Raises TokenizerError naming the path on failure. Accepted:

    - a Hugging Face directory holding `tokenizer.json` (preferred) or `tokenizer.model`, plus the optional
      `tokenizer_config.json` (chat template, BOS/EOS/pad tokens, `add_bos_token`), `chat_template.jinja`
      and `generation_config.json` (further end-of-generation ids);
    - a `tokenizer.json` file, encoded by the `tokenizers` library;
    - a SentencePiece `.model` file, encoded by the `sentencepiece` library;
    - a `.gguf` file with the vocabulary in its metadata, read with `gguf.GGUFReader`: byte-level BPE
      (`tokenizer.ggml.model` "gpt2", rebuilt with `tokenizers` using the pre-tokenizer regexes llama.cpp
      uses for `tokenizer.ggml.pre`) or SentencePiece-style (`"llama"`, score-ordered merges);
    - a llama2.c `tokenizer.bin`, encoded with llama2.c's own score-ordered merge algorithm.
    """
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
