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
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    for noisy in ("absl", "jax._src", "orbax", "etils"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


@contextlib.contextmanager
def user_errors(prog: str, extra: tuple[type[BaseException], ...] = ()):
    """Prints `prog: error: MESSAGE` and exits 2 for errors caused by the user's input."""
    from jaxinfer.tokenizer import TokenizerError

    try:
        yield
    except USER_ERRORS + (TokenizerError, ValueError) + extra as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        sys.exit(2)


def use_compile_cache(path: str) -> None:
    """Sends every compilation from now on through JAX's persistent cache in `path`, all entries kept.

    Also when the process already compiled with another (or no) cache directory: JAX fixes the cache
    at the first compilation, so it is reset here.
    """
    import os

    import jax
    from jax.experimental.compilation_cache import compilation_cache

    os.makedirs(path, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    compilation_cache.reset_cache()
