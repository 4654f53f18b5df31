"""A GGUF file's key-value metadata, read directly (only the header, never the tensors).

`gguf.GGUFReader` builds a numpy view per field part, which takes seconds for a 49k-token vocabulary;
this walks the same bytes with `struct` and turns numeric arrays into lists with one `numpy` call.
"""

from __future__ import annotations

import mmap
import struct
from pathlib import Path

import numpy as np

_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9


class GGUFMetadataError(ValueError):
    """The file is not GGUF, or its metadata is truncated or malformed."""


def read_gguf_metadata(path: str | Path) -> dict:
    """{key: value}: strings, numbers, bools, and lists of them."""
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        try:
            return _parse(buf)
        except (struct.error, IndexError, ValueError, UnicodeDecodeError) as e:
            raise GGUFMetadataError(f"malformed GGUF metadata ({type(e).__name__}: {e})") from None


def _parse(buf) -> dict:
    if buf[:4] != b"GGUF":
        raise GGUFMetadataError(f"not a GGUF file (magic {bytes(buf[:4])!r})")
    version = struct.unpack_from("<I", buf, 4)[0]
    if version < 2:
        raise GGUFMetadataError(f"GGUF version {version} is not supported (2 or later)")
    _, count = struct.unpack_from("<QQ", buf, 8)
    pos, out = 24, {}
    for _ in range(count):
        key, pos = _string(buf, pos)
        kind = struct.unpack_from("<I", buf, pos)[0]
        out[key], pos = _value(buf, pos + 4, kind)
    return out


def _string(buf, pos: int) -> tuple[str, int]:
    n = struct.unpack_from("<Q", buf, pos)[0]
    end = pos + 8 + n
    if end > len(buf):
        raise ValueError("string runs past the end of the file")
    return buf[pos + 8 : end].decode("utf-8", errors="surrogateescape"), end


def _value(buf, pos: int, kind: int):
    if kind == _STRING:
        return _string(buf, pos)
    if kind in _SCALARS:
        fmt = _SCALARS[kind]
        return struct.unpack_from(fmt, buf, pos)[0], pos + struct.calcsize(fmt)
    if kind != _ARRAY:
        raise ValueError(f"unknown value type {kind}")
    elem, n = struct.unpack_from("<IQ", buf, pos)
    pos += 12
    if elem in _SCALARS:
        dtype = np.dtype(_SCALARS[elem])
        end = pos + n * dtype.itemsize
        if end > len(buf):
            raise ValueError("array runs past the end of the file")
        return np.frombuffer(buf, dtype, n, pos).tolist(), end
    items = []
    for _ in range(n):
        item, pos = _value(buf, pos, elem)
        items.append(item)
    return items, pos
