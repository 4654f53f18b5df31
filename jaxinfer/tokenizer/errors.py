"""`TokenizerError`, the one exception every tokenizer module raises for user mistakes.

Kept in its own module so `base` (the `Tokenizer` class) and `chat` (templates it renders) can both raise it
without importing each other.
"""

from __future__ import annotations


class TokenizerError(ValueError):
    """A tokenizer file that cannot be used, or a request the tokenizer cannot serve.

    Every user mistake (missing path, unknown format, corrupt file, bad chat message) raises it with a
    one-line message naming the file and the problem.
    """
