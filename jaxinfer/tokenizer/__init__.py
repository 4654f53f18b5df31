"""Tokenizers: one `Tokenizer` interface over every vocabulary format a Llama-class checkpoint ships with.

`load_tokenizer(path)` reads a Hugging Face directory, `tokenizer.json`, SentencePiece `.model`, `.gguf` or
llama2.c `.bin`; every user mistake raises `TokenizerError` with a one-line message naming the file.
"""

from jaxinfer.tokenizer.base import StreamingDetokenizer, Tokenizer
from jaxinfer.tokenizer.errors import TokenizerError
from jaxinfer.tokenizer.loader import load_tokenizer

__all__ = ["StreamingDetokenizer", "Tokenizer", "TokenizerError", "load_tokenizer"]
