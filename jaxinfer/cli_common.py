"""Shared CLI plumbing: logging set-up and turning user mistakes into one-line errors, not tracebacks."""

from __future__ import annotations

import contextlib
import logging
import os
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


def check_paths(
    args, inputs: tuple[str, ...] = (), outputs: tuple[str, ...] = (), folders: tuple[str, ...] = ()
) -> None:
    """Refuses, before anything loads, a --model or --tokenizer path that does not exist, a
    --compile-cache or any of `folders` (flag names) that exists and is not a directory, any of `inputs`
    that is not a file, any of `outputs` that cannot be written (so no finished work is lost at the end),
    and an unknown --kv-dtype."""
    from jaxinfer.checkpoint.default_model import DEFAULT_MODEL
    from jaxinfer.config import PRESETS
    from jaxinfer.engine.config import check_kv_dtype

    check_kv_dtype(getattr(args, "kv_dtype", "auto"))

    model = getattr(args, "model", None)
    if model and model not in PRESETS and model != DEFAULT_MODEL and not os.path.exists(model):
        raise ConfigError(
            f"--model {model}: no such file or directory, and not a preset (presets: {', '.join(sorted(PRESETS))})"
        )
    if getattr(args, "tokenizer", None) and not os.path.exists(args.tokenizer):
        raise ConfigError(f"--tokenizer {args.tokenizer}: no such file or directory")
    template = getattr(args, "chat_template", None)
    if template and not os.path.isfile(template):
        raise ConfigError(f"--chat-template {template}: no such file")
    draft = getattr(args, "draft_model", None)
    mode = getattr(args, "speculative", "none")
    if draft and mode != "draft":
        raise ConfigError(f"--draft-model {draft}: needs --speculative draft (it is {mode})")
    if mode == "draft" and not draft:
        raise ConfigError("--speculative draft: needs --draft-model PATH (a model with the same tokenizer)")
    if draft and draft not in PRESETS and not os.path.exists(draft):
        raise ConfigError(f"--draft-model {draft}: no such file or directory, and not a preset")
    for flag in ("--compile-cache", *folders):
        path = _flag_value(args, flag)
        if path and os.path.exists(path) and not os.path.isdir(path):
            raise ConfigError(f"{flag} {path}: exists and is not a directory")
    for flag in inputs:
        path = _flag_value(args, flag)
        if path is not None and not os.path.isfile(path):
            raise ConfigError(f"{flag} {path}: no such file")
    for flag in outputs:
        path = _flag_value(args, flag)
        folder = os.path.dirname(os.path.abspath(path)) if path else None
        if path and (os.path.isdir(path) or not os.path.isdir(folder) or not os.access(folder, os.W_OK)):
            what = "is a directory" if os.path.isdir(path) else f"cannot write a file in {folder}"
            raise ConfigError(f"{flag} {path}: {what}")


def _flag_value(args, flag: str):
    """The parsed value of `flag` ("--compile-cache" -> args.compile_cache; None where it has none)."""
    return getattr(args, flag.lstrip("-").replace("-", "_"), None)
