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
    speculative: str = "none"  # the proposer: none | ngram | draft
    spec_windows: int = 0  # verify windows run
    spec_proposed: int = 0  # proposals verified
    spec_accepted: int = 0  # of those, accepted

    @property
    def prefix_hit_rate(self) -> float:
        return self.prefix_hit_tokens / self.prefix_lookup_tokens if self.prefix_lookup_tokens else 0.0

    @property
    def spec_acceptance_rate(self) -> float:
        return self.spec_accepted / self.spec_proposed if self.spec_proposed else 0.0


def engine_status(engine) -> EngineStatus:
    s = engine.scheduler
    spec = engine.speculation.stats if engine.speculation is not None else None
    return EngineStatus(
        active_slots=len(s.running()),
        waiting=len(s.waiting),
        prefilling=sum(q.num_computed < len(q.request.prompt_ids) for q in list(s.waiting) + s.running()),
        pages_used=s.pages_used,
        pages_cached=s.pages_cached,
        pages_total=s.pages_total,
        steps=engine._steps,
        preemptions=s.preemptions,
        compilations_after_warmup=engine.compilations_after_warmup,
        steps_by_bucket=dict(engine._steps_by_bucket),
        finished=dict(engine._finished),
        buckets_ready=engine.ready_buckets,
        prefix_lookup_tokens=s.prefix.stats.lookup_tokens,
        prefix_hit_tokens=s.prefix.stats.hit_tokens,
        prompt_tokens_computed=s.prefix.stats.prompt_tokens_computed,
        prefix_evictions=s.prefix.evictions,
        speculative=engine.config.speculative if spec is not None else "none",
        spec_windows=spec.windows if spec else 0,
        spec_proposed=spec.proposed if spec else 0,
        spec_accepted=spec.accepted if spec else 0,
    )
