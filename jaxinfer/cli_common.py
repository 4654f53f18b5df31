"""Shared CLI plumbing: logging set-up and turning user mistakes into one-line errors, not tracebacks."""

from __future__ import annotations

import contextlib
import logging
import sys

from jaxinfer.checkpoint.errors import CheckpointError
from jaxinfer.config import ConfigError
from jaxinfer.sharding import MeshError

USER_ERRORS: tuple[type[BaseException], ...] = (CheckpointError, ConfigError, MeshError, FileNotFoundError)


def setup_logging(verbose: bool = False) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    for noisy in ("absl", "jax._src", "orbax", "etils"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def user_error_types(extra: tuple[type[BaseException], ...] = ()) -> tuple[type[BaseException], ...]:
    """The exception types a front end reports as the user's mistake: one line, exit status 2."""
    from jaxinfer.tokenizer import TokenizerError

    return USER_ERRORS + (TokenizerError, ValueError) + extra


def report_user_error(prog: str, error: BaseException) -> None:
    print(f"{prog}: error: {error}", file=sys.stderr)


@contextlib.contextmanager
def user_errors(prog: str, extra: tuple[type[BaseException], ...] = ()):
    """Prints `prog: error: MESSAGE` and exits 2 for errors caused by the user's input."""
    try:
        yield
    except user_error_types(extra) as e:
        report_user_error(prog, e)
        sys.exit(2)


def tokenize(tokenizer_path: str, text: str) -> list[int]:
    """`text`'s token ids under the tokenizer at `tokenizer_path` (the calibration text of
    `--quantize-calibration`, which `jaxinfer.checkpoint.load` takes as a function)."""
    from jaxinfer.tokenizer import load_tokenizer

    return load_tokenizer(tokenizer_path).encode(text)
