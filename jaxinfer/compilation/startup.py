"""Getting an engine's step executables ready at start-up, as fast as the cache allows.

  1. with `--compile-cache DIR`, load every bucket stored for exactly this configuration
     (`StepStore`): no tracing, no compiling, no warm-up run;
  2. trace the missing buckets and compile them concurrently (`Engine.compile`), and store them for
     the next start. No warm-up runs here: a fresh executable's first run (on CPU, oneDNN generating
     its kernels, up to seconds for the largest buckets) happens when the engine is idle
     (`Engine.warm_one`, the server's engine thread) or at its first use, never for unused buckets;
  3. with `serve_early`, only the buckets small batches need (up to the slots per data shard) are
     loaded or compiled before this returns; the rest load or compile on a background thread and
     join the engine as they finish. Until then the scheduler plans steps within the ready buckets (long prompts take
     more, smaller chunks), so nothing compiles on the serving path.
The engine is marked warm (`--strict-no-recompile` armed) once every bucket is in.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time

from jaxinfer.compilation.cache import persistent_cache_bypassed
from jaxinfer.compilation.step_store import StepStore
from jaxinfer.engine.executables import timed

log = logging.getLogger(__name__)


def early_buckets(engine) -> list[int]:
    """The buckets a step of only decodes needs: up to one token per slot of a data shard."""
    slots = engine.config.max_slots // engine.data
    return [b for b in engine.buckets if b <= slots] or [engine.buckets[0]]


def prepare(engine, cache_dir: str | None = None, serve_early: bool = False) -> threading.Thread | None:
    """Makes the engine's executables ready (see the module docstring); returns the background thread
    still loading or compiling larger buckets, if any."""
    report = engine.startup
    store = StepStore(cache_dir) if cache_dir else None
    first = early_buckets(engine) if serve_early else list(engine.buckets)
    _load_or_compile(engine, store, engine.keys_for(first), quiet=False)
    _penalty_rows(engine, store)
    rest = engine.keys_for([b for b in engine.buckets if b not in first])
    if not rest:
        engine.mark_warm()
        return None

    def background():
        start = time.perf_counter()
        try:
            _load_or_compile(engine, store, rest, quiet=True)
        except Exception:  # the engine keeps serving with the buckets it has
            log.exception("compiling buckets %s in the background failed; serving with %s", rest, engine.ready_buckets)
            return
        report.background_s = time.perf_counter() - start
        engine.mark_warm()
        log.info("all buckets ready %s: %s", engine.ready_buckets, report.line())

    thread = threading.Thread(target=background, name="larger-buckets", daemon=True)
    thread.start()
    log.info("serving with buckets %s while %s load or compile in the background", engine.ready_buckets, rest)
    return thread


def _load_or_compile(engine, store, keys, quiet: bool) -> None:
    """Loads what the store has of the step `keys` (a miss is logged unless `quiet`: it was, for the
    first ones), then compiles the others."""
    report = engine.startup
    if store is not None:
        loaded, seconds = timed(store.load, engine, keys, quiet)
        report.loaded += len(loaded)
        report.load_executables_s += seconds
        engine.install(loaded, proven=True)  # loading proved them: no warm-up run
    _compile(engine, store, [k for k in keys if k not in engine.ready_keys])


def _penalty_rows(engine, store) -> None:
    """The penalty-row writer (one small executable) from the store, else compiled (and stored)."""
    name = engine.penalty_rows.NAME
    loaded = store.load(engine, [name], quiet=True) if store is not None else {}
    if name in loaded:
        engine.penalty_rows.install(loaded[name])
        return
    with persistent_cache_bypassed() if store is not None else contextlib.nullcontext():
        compiled = engine.penalty_rows.compile()
    engine.penalty_rows.install(compiled)
    if store is not None:
        store.save(engine, {name: compiled})


def _compile(engine, store, buckets) -> None:
    if not buckets:
        return
    with persistent_cache_bypassed() if store is not None else contextlib.nullcontext():
        compiled = engine.compile(buckets)
    engine.install(compiled)  # each runs once when the engine is idle (`Engine.warm_one`), or at first use
    if store is not None:
        store.save(engine, compiled)
