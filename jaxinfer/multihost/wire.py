"""Messages on the control channel: a JSON header and raw numpy arrays (no pickle: a peer's bytes are
never executed). Frame: 8-byte big-endian header length, the header, then each array's bytes."""

from __future__ import annotations

import json
import socket
import struct
import threading

import numpy as np

_LENGTH = struct.Struct(">Q")
MAX_HEADER = 1 << 20


class ChannelClosed(ConnectionError):
    """The peer closed the connection (it exited, was killed, or its host went away)."""


class Connection:
    """One peer's socket; `send` is safe from several threads, `receive` belongs to one reader thread."""

    def __init__(self, sock: socket.socket):
        if sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # small step messages go at once
        self.sock = sock
        self._send_lock = threading.Lock()

    def send(self, kind: str, meta: dict | None = None, arrays: dict[str, np.ndarray] | None = None) -> None:
        arrays = {k: np.ascontiguousarray(v) for k, v in (arrays or {}).items()}
        header = json.dumps(
            {"kind": kind, "meta": meta or {}, "arrays": [[k, v.dtype.str, list(v.shape)] for k, v in arrays.items()]}
        ).encode()
        parts = [_LENGTH.pack(len(header)), header] + [memoryview(v).cast("B") for v in arrays.values() if v.size]
        with self._send_lock:
            for part in parts:
                self.sock.sendall(part)

    def receive(self) -> tuple[str, dict, dict[str, np.ndarray]]:
        (length,) = _LENGTH.unpack(self._read(_LENGTH.size))
        if length > MAX_HEADER:
            raise ConnectionError(f"control channel: a header of {length} bytes (limit {MAX_HEADER}); not a peer")
        header = json.loads(self._read(length))
        arrays = {}
        for name, dtype, shape in header["arrays"]:
            dtype = np.dtype(dtype)
            if dtype.hasobject:
                raise ConnectionError(f"control channel: array {name!r} of object dtype")
            count = int(np.prod(shape, dtype=np.int64))
            arrays[name] = np.frombuffer(self._read(count * dtype.itemsize), dtype).reshape(shape)
        return header["kind"], header["meta"], arrays

    def _read(self, n: int) -> bytes:
        buf = bytearray(n)
        view, got = memoryview(buf), 0
        while got < n:
            k = self.sock.recv_into(view[got:])
            if k == 0:
                raise ChannelClosed("connection closed")
            got += k
        return bytes(buf)

    def close(self) -> None:
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()
