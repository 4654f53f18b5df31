"""The engine's state as plain numbers: what the server publishes and the batch job summarizes."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class EngineStatus:
    """A snapshot of the engine's state as plain numbers (safe to hand to other threads)."""

    active_slots: int
    waiting: int
    prefilling: int  # requests whose prompt is not yet all in the cache (waiting ones included)
    pages_used: int  # referenced by requests in flight
    pages_cached: int  # kept by the prefix cache for later requests, evictable
    pages_total: int
    steps: int
    preemptions: int
    compilations_after_warmup: int
    steps_by_bucket: dict[int, int]
    finished: dict[str, int]  # finish reason -> requests
    buckets_ready: tuple[int, ...]  # buckets steps can use now (all of them once start-up is complete)
    prefix_lookup_tokens: int  # prompt tokens of admitted requests
    prefix_hit_tokens: int  # of those, served from the prefix cache
    prompt_tokens_computed: int  # prompt tokens that ran through the model (recomputes included)
    prefix_evictions: int  # cached pages evicted for new allocations

    @property
    def prefix_hit_rate(self) -> float:
        return self.prefix_hit_tokens / self.prefix_lookup_tokens if self.prefix_lookup_tokens else 0.0
