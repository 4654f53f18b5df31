"""The vocabulary in a `.gguf` file's metadata (`gguf_metadata`): byte-level BPE (`tokenizer.ggml.model`
"gpt2", rebuilt with `tokenizers` using the pre-tokenizer regexes llama.cpp uses for `tokenizer.ggml.pre`) or
SentencePiece-style ("llama", score-ordered merges).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import tokenizers
from tokenizers import AddedToken, Regex, models, pre_tokenizers

from jaxinfer.tokenizer.base import (
    _CONTROL,
    _NORMAL,
    _UNKNOWN,
    _USER_DEFINED,
    Tokenizer,
    TokenizerError,
    _byte_level_bytes,
)
from jaxinfer.tokenizer.gguf_metadata import GGUFMetadataError, read_gguf_metadata
from jaxinfer.tokenizer.spm import _scored_bpe_tokenizer

# Pre-tokenizer regexes per `tokenizer.ggml.pre`, copied from llama.cpp's llm_tokenizer_bpe; each is applied
# in turn, keeping matches and the text between them as separate pieces.
_GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_PRE_TOKENIZERS: dict[str, tuple[tuple[str, ...], bool]] = {  # flavour -> (regexes, ignore_merges)
    **dict.fromkeys(["default", "gpt2", "mpt", "olmo", "jais"], ((_GPT2_SPLIT,), False)),
    **dict.fromkeys(
        ["smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva"],
        ((r"\p{N}", _GPT2_SPLIT), False),
    ),
    **dict.fromkeys(
        ["llama3", "llama-bpe", "llama-v3", "dbrx", "smaug-bpe", "falcon3", "pixtral"], ((_LLAMA3_SPLIT,), True)
    ),
    **dict.fromkeys(["qwen2", "deepseek-r1-qwen", "stablelm2"], ((_QWEN2_SPLIT,), False)),
}


def _load_gguf(path: Path) -> Tokenizer:
    """The vocabulary embedded in a GGUF file's metadata (llama.cpp's `tokenizer.*` keys)."""
    try:
        metadata = read_gguf_metadata(path)
    except GGUFMetadataError as exc:
        raise TokenizerError(f"{path}: corrupt or truncated GGUF file ({exc})") from None

    def field(key: str, default=None, required: bool = False):
        value = metadata.get(key)
        if value is None:
            if required:
                raise TokenizerError(f"{path}: GGUF metadata has no {key!r}")
            return default
        return value

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
            str(path),
            tokens,
            scores,
            types,
            add_space_prefix=field("tokenizer.ggml.add_space_prefix", True),
            bos_id=bos_id,
            eos_ids=eos_ids,
            pad_id=pad_id,
            uses_bos=field("tokenizer.ggml.add_bos_token", True),
            chat_template=template,
        )
    if model == "gpt2":
        encoder = _byte_level_bpe(
            path, tokens, field("tokenizer.ggml.merges", required=True), types, field("tokenizer.ggml.pre", "default")
        )
        literal = {i for i, t in enumerate(types) if t in (_CONTROL, _USER_DEFINED)}
        return Tokenizer(
            source=str(path),
            pieces=tokens,
            token_bytes=[p.encode() if i in literal else _byte_level_bytes(p) for i, p in enumerate(tokens)],
            encode_text=encoder,
            special_ids=[i for i, t in enumerate(types) if t in (_CONTROL, _UNKNOWN)],
            bos_id=bos_id,
            eos_ids=eos_ids,
            pad_id=pad_id,
            uses_bos=field("tokenizer.ggml.add_bos_token", False),
            chat_template=template,
        )
    raise TokenizerError(f"{path}: unsupported GGUF tokenizer model {model!r} (supported: 'gpt2', 'llama')")


def _byte_level_bpe(
    path: Path, tokens: list[str], merges: list[str], types: list[int], flavour: str
) -> Callable[[str], list[int]]:
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
