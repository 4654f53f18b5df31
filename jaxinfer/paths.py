"""Where jaxinfer keeps what it builds on a machine: converted default models, native CPU kernels."""

from __future__ import annotations

import functools
import hashlib
import json
import os
import pathlib


def default_cache_dir() -> pathlib.Path:
    """`$JAXINFER_CACHE`, else `~/.cache/jaxinfer`."""
    return pathlib.Path(os.environ.get("JAXINFER_CACHE") or pathlib.Path.home() / ".cache" / "jaxinfer")


@functools.cache
def source_hash() -> str:
    """A hash of jaxinfer's and its kernels' source files: what jaxinfer caches from its own code (step
    executables, parameters in the engine's layout) is rebuilt after any change to it."""
    root = pathlib.Path(__file__).resolve().parents[1]
    h = hashlib.sha256()
    for folder in ("jaxinfer", "pallas_kernels"):
        for path in sorted((root / folder).rglob("*")):
            if path.suffix in (".py", ".cc", ".h") and "proto" not in path.parts:
                h.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes())
    return h.hexdigest()[:16]


def content_key(identity: dict) -> str:
    """The folder name of a cached artifact: a hash of everything it depends on (JSON-able)."""
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:24]
