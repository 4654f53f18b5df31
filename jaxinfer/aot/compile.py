"""Lowers and compiles the engine's step for every token bucket from abstract shapes (no weights).

The step is `build_step_fn` itself, given a `ShardedModel` whose params are `ShapeDtypeStruct`s with
shardings; the step inputs are built by the engine's own host-array builder (`Engine._empty_host`)
and turned into sharded `ShapeDtypeStruct`s, so the compiled signatures are exactly the engine's.
"""
from __future__ import annotations

import dataclasses
import functools
import time
import types

import jax
import numpy as np

from jaxinfer.engine.engine import Engine, EngineConfig, resolve_attention, resolve_layer_loop, token_buckets
from jaxinfer.engine.step import StepInputs, attention_impl, build_step_fn
from jaxinfer.kv_cache import CacheShape, abstract_cache, pages_needed
from jaxinfer.model.forward import ShardedModel
from jaxinfer.model.params import abstract_params
from jaxinfer.sharding import logical_sharding

COST_SECONDS_KEYS = ("optimal_seconds", "estimated_seconds", "seconds")


@dataclasses.dataclass
class StepSpecs:
    """Everything a step is compiled for, as abstract sharded shapes."""

    model: ShardedModel           # params: ShapeDtypeStruct tree
    cache: object                 # [layers, data * pages, page_size, 2 * kv_heads, head_dim] or one per layer
    cache_shape: CacheShape
    prev_tokens: jax.ShapeDtypeStruct  # i32 [D, S]
    buckets: tuple[int, ...]
    attention: str
    row: object                   # sharding of [D, ...] rows


@dataclasses.dataclass
class BucketResult:
    bucket: int
    seconds: float                # lower + compile wall time
    memory: dict[str, int]        # per device: argument, output, alias, temp, generated_code
    estimated_seconds: float | None  # the compiler's cost model
    compiled: object = dataclasses.field(repr=False)


def step_specs(config, layout, mesh, dtype, engine: EngineConfig, pages_per_shard: int, platform: str) -> StepSpecs:
    data = mesh.shape["data"]
    model = ShardedModel(config, layout, mesh, abstract_params(config, layout, dtype, mesh), dtype)
    model.use_layer_loop(resolve_layer_loop(engine, platform))  # the params layout the engine will run
    cache_shape = CacheShape(layers=config.num_layers, data_shards=data, pages_per_shard=pages_per_shard,
                             page_size=engine.page_size, kv_heads=layout.kv_heads, head_dim=config.head_dim,
                             dtype=str(np.dtype(dtype)))
    cache = abstract_cache(mesh, cache_shape, per_layer=model.layer_loop == "unrolled")
    row = logical_sharding(mesh, ("batch", None))
    prev = jax.ShapeDtypeStruct((data, engine.max_slots // data), np.int32, sharding=row)
    attention = resolve_attention(engine.attention, platform)  # what the engine will run there
    return StepSpecs(model, cache, cache_shape, prev, token_buckets(engine, data, platform), attention, row)


def step_inputs(specs: StepSpecs, engine: EngineConfig, bucket: int) -> StepInputs:
    """The engine's idle inputs for `bucket`, as ShapeDtypeStructs sharded on their leading (data) axis."""
    mesh = specs.model.mesh
    fake = types.SimpleNamespace(data=mesh.shape["data"], slots_per_shard=engine.max_slots // mesh.shape["data"],
                                 pages_per_slot=pages_needed(engine.max_context, engine.page_size),
                                 cache_shape=specs.cache_shape)
    host = Engine._empty_host(fake, bucket)
    spec = {k: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=logical_sharding(
        mesh, ("batch",) + (None,) * (a.ndim - 1))) for k, a in host.items()}
    return StepInputs.from_flat(spec)


def attention_for(kind: str, platform: str):
    """The attention implementation the engine would run on `platform` (the kernel compiled, never interpreted)."""
    if kind == "kernel" and platform == "tpu":
        from pallas_kernels.ragged_paged_attention import ragged_paged_attention

        return functools.partial(ragged_paged_attention, interpret=False)
    return attention_impl(kind)


def compile_buckets(specs: StepSpecs, engine: EngineConfig, platform: str, buckets=None):
    """Compiles the step for each bucket (default: all the engine uses); yields a BucketResult per bucket."""
    fn = build_step_fn(specs.model, specs.cache_shape, attention_for(specs.attention, platform), specs.row)
    for bucket in buckets or specs.buckets:
        start = time.perf_counter()
        compiled = fn.lower(specs.model.params, specs.cache, step_inputs(specs, engine, bucket),
                            specs.prev_tokens).compile()
        seconds = time.perf_counter() - start
        yield BucketResult(bucket, seconds, memory_figures(compiled), estimated_seconds(compiled), compiled)


def memory_figures(compiled) -> dict[str, int]:
    mem = compiled.memory_analysis()
    return {k: int(getattr(mem, f"{k}_size_in_bytes", 0) or 0)
            for k in ("argument", "output", "alias", "temp", "generated_code")}


def estimated_seconds(compiled) -> float | None:
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else (cost or {})
    for key in COST_SECONDS_KEYS:
        if key in cost:
            return float(cost[key])
    return None
