"""Where jaxinfer keeps what it builds on a machine: converted default models, native CPU kernels."""

from __future__ import annotations

import os
import pathlib


def default_cache_dir() -> pathlib.Path:
    """`$JAXINFER_CACHE`, else `~/.cache/jaxinfer`."""
    return pathlib.Path(os.environ.get("JAXINFER_CACHE") or pathlib.Path.home() / ".cache" / "jaxinfer")
