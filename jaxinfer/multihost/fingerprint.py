"""What must be identical on every process of one mesh, and how a difference is named.

A fingerprint maps a name (a flag such as `--max-slots`, a package version, the local device count)
to `[compared value, shown value]`: the checkpoint is compared by content (size and hashes of its
head and tail, and its small metadata files), since the same file may sit at different paths on
different hosts, but shown by its path.
"""

from __future__ import annotations

import hashlib
import os
import pathlib
import sys

_EDGE = 1 << 20  # bytes hashed at each end of a large file


def runtime_facts() -> dict[str, list]:
    from importlib.metadata import version

    import flax
    import jax
    import jaxlib

    devices = jax.local_devices()
    facts = {
        "python": ".".join(map(str, sys.version_info[:2])),
        "jax": jax.__version__,
        "jaxlib": jaxlib.__version__,
        "flax": flax.__version__,
        "jaxinfer": version("jaxinfer"),
        "platform": jax.default_backend(),
        "local devices": len(devices),
        "device kind": devices[0].device_kind if devices else "",
    }
    return {k: [v, v] for k, v in facts.items()}


def flag_facts(flags: dict) -> dict[str, list]:
    return {f"--{name.replace('_', '-')}": [_plain(v), _plain(v)] for name, v in flags.items()}


def model_fact(spec: str | None) -> dict[str, list]:
    """The checkpoint by content: a preset or the embedded model by name, a path by `content_digest`."""
    if not spec or not os.path.exists(spec):
        return {"--model": [spec or "default", spec or "the embedded default model"]}
    return {"--model": [content_digest(pathlib.Path(spec)), spec]}


def content_digest(path: pathlib.Path) -> str:
    """A cheap digest of a file or directory tree: names, sizes, the first and last MiB of each file."""
    h = hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for f in files:
        size = f.stat().st_size
        h.update(f"{f.relative_to(path) if path.is_dir() else ''}\0{size}\0".encode())
        with open(f, "rb") as fh:
            h.update(fh.read(_EDGE))
            if size > 2 * _EDGE:
                fh.seek(size - _EDGE)
                h.update(fh.read(_EDGE))
    return h.hexdigest()[:16]


def differences(leader: dict, worker: dict, pid: int) -> list[str]:
    """One phrase per entry where `worker` (process `pid`) differs from the leader (process 0)."""
    out = []
    for name in sorted(set(leader) | set(worker)):
        mine, theirs = leader.get(name, [None, "(absent)"]), worker.get(name, [None, "(absent)"])
        if mine[0] != theirs[0]:
            out.append(f"{name} is {mine[1]} on process 0 but {theirs[1]} on process {pid}")
    return out


def _plain(value):
    """A JSON-stable form of a flag value (tuples and lists compare alike after the round trip)."""
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value if isinstance(value, (str, int, float, bool, type(None))) else str(value)
