"""The engine's compiled steps, one executable per token bucket, and how they get there.

Each bucket's step is traced and lowered on the calling thread (Python, under the GIL) and handed to
a thread pool to compile while the next one is traced: XLA releases the GIL while it compiles, so the
buckets compile side by side and beside the tracing. The engine calls the compiled executables
directly; a call whose shapes do not match fails instead of compiling, so nothing ever compiles on
the serving path. `StartupReport` collects where start-up time went, for the batch job's summary,
the server's log and Prometheus.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import os
import time


@dataclasses.dataclass
class StartupReport:
    load_s: float = 0.0  # reading the model (set by whoever loads it)
    loaded: int = 0  # buckets whose executables were read back from disk (no tracing, no compiling)
    load_executables_s: float = 0.0
    trace_s: float = 0.0  # tracing and lowering the compiled buckets
    compiled: int = 0  # buckets compiled (XLA, or its persistent compilation cache)
    compile_s: float = 0.0  # wall time of the compiles beyond the tracing they overlap
    cache_hits: int = 0  # compilations JAX's persistent compilation cache answered
    run_s: float = 0.0  # first runs of freshly compiled buckets on idle inputs
    background_s: float | None = None  # compiling the larger buckets after serving started

    @property
    def traced(self) -> int:
        """Buckets traced: every compiled one was, and no loaded one is."""
        return self.compiled

    @property
    def ready_s(self) -> float:
        """From the start of loading until the engine can run its first step."""
        return self.load_s + self.load_executables_s + self.trace_s + self.compile_s + self.run_s

    def line(self) -> str:
        text = (
            f"start-up {self.ready_s:.2f}s: model load {self.load_s:.2f}s; {self.loaded} executables loaded "
            f"in {self.load_executables_s:.2f}s; {self.traced} traced in {self.trace_s:.2f}s; {self.compiled} "
            f"compiled in {self.compile_s:.2f}s ({self.cache_hits} persistent-cache hits); warm-up runs "
            f"{self.run_s:.2f}s"
        )
        if self.background_s is not None:
            text += f"; larger buckets loaded or compiled in the background in {self.background_s:.2f}s"
        return text


def compile_pipelined(lower, buckets, workers: int | None = None) -> tuple[dict, float, float]:
    """Traces each bucket with `lower(bucket)` on this thread and hands it to a thread pool to compile
    at once, so tracing the next bucket overlaps compiling the previous ones.
    -> ({bucket: Compiled}, seconds spent tracing, seconds after tracing until every compile finished)."""
    buckets = list(buckets)
    if not buckets:
        return {}, 0.0, 0.0
    workers = min(len(buckets), workers or os.cpu_count() or 1)
    trace = 0.0
    with concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix="compile") as pool:
        futures = {}
        for bucket in buckets:
            lowered, seconds = timed(lower, bucket)
            trace += seconds
            futures[bucket] = pool.submit(lowered.compile)
        traced_at = time.perf_counter()
        compiled = {b: f.result() for b, f in futures.items()}
    return compiled, trace, time.perf_counter() - traced_at


def timed(fn, *args):
    start = time.perf_counter()
    out = fn(*args)
    return out, time.perf_counter() - start
