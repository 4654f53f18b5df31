"""Lowers and compiles the engine's step for every token bucket from abstract shapes (no weights).

The step is `build_step_fn` itself, given a `ShardedModel` whose params are `ShapeDtypeStruct`s with
shardings; the step inputs come from the engine's own `HostBatchBuilder`, turned into sharded
`ShapeDtypeStruct`s, so the compiled signatures are exactly the engine's.
"""

from __future__ import annotations

import dataclasses
import time

import numpy as np

from jaxinfer.engine.config import EngineConfig, token_buckets
from jaxinfer.engine.pages import pages_needed
from jaxinfer.engine.sampler_state import RowSetter, abstract_state
from jaxinfer.engine.step import build_step_fn
from jaxinfer.engine.step_inputs import HostBatchBuilder, StepInputs, abstract_inputs
from jaxinfer.kv_cache import CacheShape, abstract_cache
from jaxinfer.model.forward import ShardedModel
from jaxinfer.model.params import abstract_params
from jaxinfer.platform import Platform

COST_SECONDS_KEYS = ("optimal_seconds", "estimated_seconds", "seconds")


@dataclasses.dataclass
class StepSpecs:
    """Everything a step is compiled for, as abstract sharded shapes."""

    model: ShardedModel  # params: ShapeDtypeStruct tree
    cache: object  # [layers, data * pages, page_size, 2 * kv_heads, head_dim] or one per layer
    cache_shape: CacheShape
    state: object  # the SamplerState: previous tokens [D, S] and penalty rows [D, S, vocab]
    buckets: tuple[int, ...]
    platform: Platform
    inputs: HostBatchBuilder


@dataclasses.dataclass
class BucketResult:
    bucket: int
    seconds: float  # lower + compile wall time
    memory: dict[str, int]  # per device: argument, output, alias, temp, generated_code
    estimated_seconds: float | None  # the compiler's cost model
    compiled: object = dataclasses.field(repr=False)


def step_specs(
    config, layout, mesh, dtype, engine: EngineConfig, pages_per_shard: int, platform: Platform
) -> StepSpecs:
    data = mesh.shape["data"]
    model = ShardedModel(config, layout, mesh, abstract_params(config, layout, dtype, mesh), dtype)
    model = model.with_layer_loop(platform.layer_loop)  # the params layout the engine will run
    cache_shape = CacheShape(
        layers=config.num_layers,
        data_shards=data,
        pages_per_shard=pages_per_shard,
        page_size=engine.page_size,
        kv_heads=layout.kv_heads,
        head_dim=config.head_dim,
        dtype=str(np.dtype(dtype)),
    )
    cache = abstract_cache(mesh, cache_shape, model.layer_loop)
    slots = engine.max_slots // data
    state = abstract_state(mesh, data, slots, config.vocab_size)
    inputs = HostBatchBuilder(
        data, slots, pages_needed(engine.max_context, engine.page_size), pages_per_shard, engine.page_size
    )
    buckets = token_buckets(engine.step_budget(data), platform.min_bucket)
    return StepSpecs(model, cache, cache_shape, state, buckets, platform, inputs)


def step_inputs(specs: StepSpecs, bucket: int) -> StepInputs:
    """The engine's idle inputs for `bucket`, as ShapeDtypeStructs sharded on their leading (data) axis."""
    return abstract_inputs(specs.inputs, specs.model.mesh, bucket)


def compile_buckets(specs: StepSpecs, buckets=None):
    """Compiles the step for each bucket (default: all the engine uses); yields a BucketResult per bucket.
    For a TPU target the platform's Pallas kernel is compiled, never interpreted."""
    fn = build_step_fn(specs.model, specs.cache_shape, specs.platform)
    for bucket in buckets or specs.buckets:
        start = time.perf_counter()
        compiled = fn.lower(specs.model.params, specs.cache, step_inputs(specs, bucket), specs.state).compile()
        seconds = time.perf_counter() - start
        yield BucketResult(bucket, seconds, memory_figures(compiled), estimated_seconds(compiled), compiled)


def compile_penalty_rows(specs: StepSpecs) -> dict:
    """{RowSetter.NAME: executable}: the engine's other executable, stored beside the steps."""
    i = specs.inputs
    setter = RowSetter(specs.model.mesh, i.data_shards, i.slots_per_shard, specs.model.config.vocab_size)
    return {RowSetter.NAME: setter.compile()}


def memory_figures(compiled) -> dict[str, int]:
    mem = compiled.memory_analysis()
    return {
        k: int(getattr(mem, f"{k}_size_in_bytes", 0) or 0)
        for k in ("argument", "output", "alias", "temp", "generated_code")
    }


def estimated_seconds(compiled) -> float | None:
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else (cost or {})
    for key in COST_SECONDS_KEYS:
        if key in cost:
            return float(cost[key])
    return None
