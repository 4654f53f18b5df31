"""The engine's compiled steps by key, as they arrive from any thread (compiled, or loaded from disk).

A key is a token bucket (int: the plain step) or `verify_key(bucket)` (str: the bucket's verify
variant, with extra sample rows for speculation's windows). Executables installed by any thread are
taken up by the engine thread at its next step. Unless proven (loaded from disk, or run once), an
executable is run once on idle inputs while the engine is idle, so its first-run work (on CPU,
oneDNN's kernel generation) does not land on a request.
"""

from __future__ import annotations

import threading

VERIFY_PREFIX = "verify_"


def verify_key(bucket: int) -> str:
    return f"{VERIFY_PREFIX}{bucket}"


def key_bucket(key: int | str) -> int:
    return key if isinstance(key, int) else int(key.removeprefix(VERIFY_PREFIX))


def key_order(key: int | str) -> tuple[int, int]:
    """Sort keys by bucket, the plain step first."""
    return key_bucket(key), isinstance(key, str)


class StepRegistry:
    def __init__(self):
        self.ready: dict = {}  # key -> executable, as the engine thread sees them
        self._arrived: dict = {}  # installed by any thread, taken up at the next step
        self._unproven: set = set()  # installed keys that have not run yet
        self._lock = threading.Lock()
        self.compiling: threading.Thread | None = None  # larger buckets still compiling (set by the bootstrap)

    def install(self, executables: dict, proven: bool = False) -> None:
        with self._lock:
            self._arrived.update(executables)
            if not proven:
                self._unproven.update(executables)

    @property
    def unproven(self) -> tuple:
        with self._lock:
            return tuple(sorted(self._unproven, key=key_order))

    @property
    def keys(self) -> tuple:
        """Every installed key, taken up or not."""
        with self._lock:
            return tuple(sorted(set(self.ready) | set(self._arrived), key=key_order))

    def ran(self, key) -> None:
        """`key` has run once now (its first-run work is done)."""
        if key in self._unproven:  # unlocked read: once proven, a key never becomes unproven again
            with self._lock:
                self._unproven.discard(key)

    def take_arrived(self) -> bool:
        """Takes up what arrived since the last call; True if anything did."""
        with self._lock:
            arrived, self._arrived = self._arrived, {}
        self.ready.update(arrived)
        return bool(arrived)

    def get(self, key):
        """The executable of `key`; on a multi-host worker one still compiling in the background is waited
        for (the leader only uses keys it has, and every process compiles the same ones)."""
        if key not in self.ready:
            self.take_arrived()
            if key not in self.ready and self.compiling is not None:
                self.compiling.join()
                self.take_arrived()
        return self.ready[key]
