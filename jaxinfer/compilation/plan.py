"""Per-device memory plan of a deployment: weights + KV cache + the compiler's temporaries vs the chip.

Weights and KV bytes are exact shard sizes from the shardings; temporaries and the step's own inputs,
outputs and code come from XLA's `memory_analysis()` of the compiled steps (the largest over buckets,
which is an upper bound on any one step's peak since all steps share the weights and the cache).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from jaxinfer.engine.capacity import request_pages_per_shard
from jaxinfer.engine.pages import pages_needed
from jaxinfer.kv_cache import CacheShape, model_cache_shape, pages_for_budget, pages_for_memory_fraction

GiB = 2**30


@dataclasses.dataclass
class MemoryPlan:
    memory: int  # per device, the chip's HBM (or the host's share)
    weights: int
    kv: int
    largest_temp: int | None  # None: nothing compiled (weights and KV alone do not fit)
    step_io: int | None  # step inputs/outputs (beyond weights and cache) + generated code
    kv_pages: int  # per (data, sequence) shard, i.e. per device, as configured
    max_kv_pages: int | None  # per device that fit next to weights and temporaries
    max_slots: int | None  # concurrent requests of max_context that those pages hold (all shards)
    longest_context: int | None = None  # tokens one request can hold in them (its pages dealt over sequence)

    @property
    def total(self) -> int:
        return self.weights + self.kv + (self.largest_temp or 0) + (self.step_io or 0)

    @property
    def fits(self) -> bool:
        return self.total <= self.memory

    def rows(self) -> list[tuple[str, int]]:
        rows = [("weights", self.weights), ("KV cache", self.kv)]
        if self.largest_temp is not None:
            rows += [("largest temp", self.largest_temp), ("step I/O + code", self.step_io)]
        return rows + [("total", self.total), ("device memory", self.memory)]


def resolve_pages(
    engine, one_page: CacheShape, memory: int, weights: int, tensor: int, data: int, sequence: int = 1
) -> int:
    """Pages per (data, sequence) shard the engine would allocate (`capacity.resolve_pages` with the
    planner's memory)."""
    if engine.kv_pages is not None:
        return engine.kv_pages
    if engine.kv_memory_fraction is not None:
        return pages_for_memory_fraction(memory, engine.kv_memory_fraction, weights, one_page, tensor)
    return (engine.max_slots // data) * request_pages_per_shard(engine.max_context, engine.page_size, sequence)


def build(
    memory: int,
    weights: int,
    kv: int,
    one_page: CacheShape,
    kv_pages: int,
    tensor: int,
    data: int,
    max_context: int,
    results=(),
    sequence: int = 1,
) -> MemoryPlan:
    """`max_slots`: requests of `max_context` the largest cache holds; `longest_context`: the tokens one
    request can hold in it, its pages dealt over the `sequence` shards (before the model's own limit)."""
    temp = io = None
    if results:
        temp = max(r.memory["temp"] for r in results)
        io = max(
            r.memory["argument"] - weights - kv + r.memory["output"] - r.memory["alias"] + r.memory["generated_code"]
            for r in results
        )
    max_pages = pages_for_budget(memory - weights - (temp or 0) - (io or 0), one_page, tensor)
    max_slots = max_pages // request_pages_per_shard(max_context, one_page.page_size, sequence) * data
    longest = max_pages * sequence * one_page.page_size
    return MemoryPlan(memory, weights, kv, temp, io, kv_pages, max_pages, max_slots, longest)


def format_bytes(n: int | None) -> str:
    if n is None:
        return "-"
    return f"{n / GiB:.2f} GiB" if n >= GiB else f"{n / 2**20:.1f} MiB"


def bucket_table(results) -> str:
    lines = [
        "| bucket | compile s | argument | output | temp | code | est. step time |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        m = r.memory
        est = "-" if r.estimated_seconds is None else f"{r.estimated_seconds * 1e3:.3f} ms"
        lines.append(
            f"| {r.bucket} | {r.seconds:.1f} | {format_bytes(m['argument'])} | {format_bytes(m['output'])} "
            f"| {format_bytes(m['temp'])} | {format_bytes(m['generated_code'])} | {est} |"
        )
    return "\n".join(lines)


def kv_line(one_page: CacheShape, tensor: int) -> str:
    """What one cached token costs in the cache's storage dtype (scales included)."""
    per_token = one_page.bytes_per_token
    return (
        f"KV cache {one_page.dtype}: {per_token:,.0f} bytes per token ({one_page.layers} layers, "
        f"{one_page.kv_heads} KV heads, K and V{', scales included' if one_page.dtype == 'int8' else ''}), "
        f"{per_token / tensor:,.0f} per device"
    )


def plan_table(plan, heading: str = "per device") -> str:
    """`plan`: a MemoryPlan, or anything else with `rows()` (`hosts.HostPlan`)."""
    lines = [f"| {heading} | bytes | |", "|---|---:|---:|"]
    lines += [f"| {name} | {value} | {format_bytes(value)} |" for name, value in plan.rows()]
    return "\n".join(lines)


def suggestion(
    plan: MemoryPlan,
    config,
    dtype,
    generation: str,
    data: int,
    slots: int,
    max_context: int,
    page_size: int,
    chips: list[tuple[str, int, int]],
    kv_dtype: str,
) -> str:
    """A budget or a mesh that fits: fewer pages/slots when the weights fit, else more or bigger chips.

    `chips`: (topology, chip count, HBM bytes per chip) of the known presets; `kv_dtype`: the cache's.
    """
    per_slot = pages_needed(max_context, page_size)
    if plan.max_kv_pages and plan.max_kv_pages >= per_slot:
        fit_slots = plan.max_kv_pages // per_slot * data
        return (
            f"the weights fit: use --kv-pages {plan.max_kv_pages} (room for {fit_slots} requests of "
            f"{max_context} tokens), --max-slots {fit_slots}, or a shorter --max-context"
        )
    extra = (plan.largest_temp or 0) + (plan.step_io or 0)
    fitting = [
        (topo, n, hbm, need)
        for topo, n, hbm in sorted(chips, key=lambda c: (c[1], c[2]))
        if (need := per_device_need(config, dtype, n, slots, max_context, page_size, kv_dtype) + extra) <= hbm
    ]
    same = [f for f in fitting if f[0].split(":")[0] == generation]
    other = [f for f in fitting if f[0].split(":")[0] != generation]
    options = [
        f"--topology {topo} --mesh 1x{n} (about {need / GiB:.1f} of {hbm / GiB:.0f} GiB per chip)"
        for topo, n, hbm, need in same[:1] + other[:1]
    ]
    if not options:
        return "no preset topology holds it; reduce --max-slots / --max-context or use a larger slice"
    return "try " + ", or ".join(options)


def per_device_need(
    config, dtype, tensor: int, slots: int, max_context: int, page_size: int, kv_dtype: str | None = None
) -> int:
    """Per-device bytes of weights + KV for `slots` requests of `max_context` on a 1 x `tensor` mesh; the
    cache in `kv_dtype` (default: the weights' dtype)."""
    import jax

    from jaxinfer.model.layout import plan_layout
    from jaxinfer.model.params import abstract_params
    from jaxinfer.sharding import per_device_bytes

    layout = plan_layout(config, tensor, quiet=True)
    mesh = jax.sharding.AbstractMesh((1, 1, tensor), ("data", "sequence", "tensor"))
    weights = per_device_bytes(abstract_params(config, layout, dtype, mesh))
    one_page = model_cache_shape(config, layout.kv_heads, 1, 1, page_size, kv_dtype or str(np.dtype(dtype)))
    return weights + slots * pages_needed(max_context, page_size) * (one_page.bytes_per_page // tensor)
