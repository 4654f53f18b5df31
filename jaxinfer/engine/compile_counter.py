"""Counts XLA compilations in this process (every backend compile, not just ours).

JAX times every executable it obtains under `backend_compile_duration`, whether XLA compiled it or
the persistent compilation cache supplied it; a cache hit also records `cache_hits` first (same
thread). Real compilations are the difference, so a server started from a warm `--compile-cache`
counts zero.
"""

from __future__ import annotations

import threading

import jax

_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"
_CACHE_HIT_EVENT = "/jax/compilation_cache/cache_hits"
_lock = threading.Lock()
_obtained = 0
_cache_hits = 0
_installed = False


def _on_duration(event: str, duration: float, **kwargs) -> None:
    global _obtained
    if event == _COMPILE_EVENT:
        with _lock:
            _obtained += 1


def _on_event(event: str, **kwargs) -> None:
    global _cache_hits
    if event == _CACHE_HIT_EVENT:
        with _lock:
            _cache_hits += 1


def install() -> None:
    global _installed
    with _lock:
        if not _installed:
            jax.monitoring.register_event_duration_secs_listener(_on_duration)
            jax.monitoring.register_event_listener(_on_event)
            _installed = True


def count() -> int:
    """XLA compilations so far (executables loaded from the persistent cache not included)."""
    install()
    return _obtained - _cache_hits


def cache_hits() -> int:
    install()
    return _cache_hits


class RecompileError(RuntimeError):
    """A compilation happened after warm-up while --strict-no-recompile was set."""
