"""The server's Prometheus series, in a registry of their own (served by `--metrics-port`).

The engine thread updates the engine-side series once per step from plain numbers (it never hands
the non-thread-safe engine to the HTTP thread); gRPC handlers count requests by method and status,
the OpenAI HTTP front end responses by route and status.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

FINISH_REASONS = ("stop", "length", "cancelled", "error")
_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
# engine figures that arrive as running totals and feed counters (attribute name = keyword)
_CUMULATIVE = ("steps", "preemptions", "compilations", "prefix_hit_tokens", "prefix_lookup_tokens", "prefix_evictions")
_SPECULATIVE = ("spec_windows", "spec_proposed", "spec_accepted")  # running totals, labelled by proposer
_TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28)


class Metrics:
    def __init__(self):
        self.registry = r = CollectorRegistry()
        self.ttft = Histogram(
            "jaxinfer_time_to_first_token_seconds",
            "Arrival to first generated token",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.tpot = Histogram(
            "jaxinfer_time_per_output_token_seconds",
            "Per request: (total - TTFT) / (tokens - 1)",
            buckets=_TOKEN_BUCKETS,
            registry=r,
        )
        self.queue_depth = Gauge("jaxinfer_queue_depth", "Requests admitted and waiting for a slot", registry=r)
        self.active_slots = Gauge("jaxinfer_active_slots", "Slots holding a request", registry=r)
        self.slots = Gauge("jaxinfer_slots", "Slots in total (--max-slots)", registry=r)
        self.kv_pages_used = Gauge("jaxinfer_kv_pages_used", "KV cache pages in use, all data shards", registry=r)
        self.kv_pages_free = Gauge("jaxinfer_kv_pages_free", "KV cache pages free, all data shards", registry=r)
        self.preemptions = Counter("jaxinfer_preemptions", "Requests evicted for KV pages and recomputed", registry=r)
        self.kv_pages_cached = Gauge(
            "jaxinfer_prefix_cache_resident_pages",
            "KV pages the prefix cache keeps for later requests (no request uses them; evictable)",
            registry=r,
        )
        self.prefix_hit_tokens = Counter(
            "jaxinfer_prefix_cache_hit_tokens", "Prompt tokens served from the prefix cache", registry=r
        )
        self.prefix_lookup_tokens = Counter(
            "jaxinfer_prefix_cache_lookup_tokens", "Prompt tokens of requests looked up in the prefix cache", registry=r
        )
        self.prefix_hit_rate = Gauge(
            "jaxinfer_prefix_cache_hit_rate", "Prefix cache hit tokens / lookup tokens since start", registry=r
        )
        self.prefix_evictions = Counter(
            "jaxinfer_prefix_cache_evictions", "Cached KV pages evicted for new allocations", registry=r
        )
        self.compilations = Counter(
            "jaxinfer_compilations_since_warmup", "XLA compilations after warm-up (should stay 0)", registry=r
        )
        self.steps = Counter("jaxinfer_engine_steps", "Engine steps dispatched", registry=r)
        self.generated_tokens = Counter("jaxinfer_generated_tokens", "Tokens generated", registry=r)
        self.release_steps = Histogram(
            "jaxinfer_cancel_release_steps",
            "Engine steps between the server learning of a client cancellation and the request's slot being freed",
            buckets=(0, 1, 2, 4, 8, 16),
            registry=r,
        )
        self.finished = Counter(
            "jaxinfer_requests_finished",
            "Requests that left the engine, by finish reason",
            ["finish_reason"],
            registry=r,
        )
        self.rpcs = Counter(
            "jaxinfer_rpc_requests", "RPCs answered, by method and gRPC status code", ["method", "code"], registry=r
        )
        self.http_requests = Counter(
            "jaxinfer_http_requests", "HTTP responses sent, by route and status code", ["route", "status"], registry=r
        )
        self.startup_seconds = Gauge(
            "jaxinfer_startup_seconds",
            "Start-up time by phase (background: larger buckets compiled while serving; ready: until SERVING)",
            ["phase"],
            registry=r,
        )
        self.startup_executables = Gauge(
            "jaxinfer_startup_executables",
            "Step executables at start-up by origin (loaded from --compile-cache, traced, compiled, "
            "answered by the persistent compilation cache)",
            ["origin"],
            registry=r,
        )
        self.spec_windows = Counter(
            "jaxinfer_speculative_windows", "Verify windows run, by proposer", ["proposer"], registry=r
        )
        self.spec_proposed = Counter(
            "jaxinfer_speculative_proposed_tokens", "Proposed tokens verified, by proposer", ["proposer"], registry=r
        )
        self.spec_accepted = Counter(
            "jaxinfer_speculative_accepted_tokens", "Proposed tokens accepted, by proposer", ["proposer"], registry=r
        )
        self.spec_rate = Gauge(
            "jaxinfer_speculative_acceptance_rate",
            "Accepted / proposed tokens since start, by proposer",
            ["proposer"],
            registry=r,
        )
        for reason in FINISH_REASONS:
            self.finished.labels(reason)
        self._totals = dict.fromkeys(_CUMULATIVE + _SPECULATIVE, 0)

    def engine_state(
        self,
        *,
        active_slots: int,
        max_slots: int,
        queue_depth: int,
        pages_used: int,
        pages_cached: int,
        pages_total: int,
        speculative: str = "none",
        **totals: int,
    ) -> None:
        """Called by the engine thread after every step with the engine's state and its running totals
        (one keyword per name in `_CUMULATIVE`, and in `_SPECULATIVE` when `speculative` names a proposer)."""
        self.active_slots.set(active_slots)
        self.slots.set(max_slots)
        self.queue_depth.set(queue_depth)
        self.kv_pages_used.set(pages_used)
        self.kv_pages_cached.set(pages_cached)
        self.kv_pages_free.set(pages_total - pages_used - pages_cached)
        for name in _CUMULATIVE:
            getattr(self, name).inc(totals[name] - self._totals[name])
            self._totals[name] = totals[name]
        if speculative != "none":
            for name in _SPECULATIVE:
                getattr(self, name).labels(speculative).inc(totals[name] - self._totals[name])
                self._totals[name] = totals[name]
            proposed = self._totals["spec_proposed"]
            self.spec_rate.labels(speculative).set(self._totals["spec_accepted"] / proposed if proposed else 0.0)
        lookups = self._totals["prefix_lookup_tokens"]
        self.prefix_hit_rate.set(self._totals["prefix_hit_tokens"] / lookups if lookups else 0.0)

    def finished_request(self, result) -> None:
        self.finished.labels(result.finish_reason).inc()
        self.generated_tokens.inc(result.completion_tokens)
        if result.ttft_s is not None:
            self.ttft.observe(result.ttft_s)
            if result.completion_tokens > 1:
                self.tpot.observe((result.total_s - result.ttft_s) / (result.completion_tokens - 1))

    def startup(self, report) -> None:
        """The engine's `StartupReport` (it changes only while larger buckets compile in the background)."""
        phases = {
            "model_load": report.load_s,
            "executables_load": report.load_executables_s,
            "trace": report.trace_s,
            "compile": report.compile_s,
            "warmup_run": report.run_s,
            "background": report.background_s or 0.0,
            "ready": report.ready_s,
        }
        for phase, seconds in phases.items():
            self.startup_seconds.labels(phase).set(seconds)
        for origin, count in (
            ("loaded", report.loaded),
            ("traced", report.traced),
            ("compiled", report.compiled),
            ("persistent_cache_hit", report.cache_hits),
        ):
            self.startup_executables.labels(origin).set(count)
