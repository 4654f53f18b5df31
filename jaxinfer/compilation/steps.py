"""Lowers and compiles the engine's step for every token bucket from abstract shapes (no weights).

The step is `build_step_fn` itself, given a `ShardedModel` whose params are `ShapeDtypeStruct`s with
shardings; the step inputs come from the engine's own `HostBatchBuilder`, turned into sharded
`ShapeDtypeStruct`s, so the compiled signatures are exactly the engine's.
"""

from __future__ import annotations

import dataclasses
import time

from jaxinfer.engine.capacity import page_table_width
from jaxinfer.engine.config import EngineConfig, token_buckets
from jaxinfer.engine.head_step import step_draft
from jaxinfer.engine.packed_inputs import PackedInputs, abstract_inputs
from jaxinfer.engine.sampler_state import RowSetter, abstract_state
from jaxinfer.engine.step import build_step_fn
from jaxinfer.engine.step_inputs import HostBatchBuilder
from jaxinfer.engine.step_registry import key_bucket, verify_key
from jaxinfer.kv_cache import CacheShape, abstract_cache, model_cache_shape
from jaxinfer.model.forward import ShardedModel
from jaxinfer.model.layout import plan_layout
from jaxinfer.model.params import abstract_params
from jaxinfer.platform import Platform
from jaxinfer.quant.spec import NONE, QuantSpec

COST_SECONDS_KEYS = ("optimal_seconds", "estimated_seconds", "seconds")


@dataclasses.dataclass
class StepSpecs:
    """Everything a step is compiled for, as abstract sharded shapes."""

    model: ShardedModel  # params: ShapeDtypeStruct tree
    cache: object  # [layers, data * pages, page rows, 2 * kv_heads, head_dim] or one per layer
    cache_shape: CacheShape
    state: object  # the SamplerState: previous tokens [D, S] and penalty rows [D, S, vocab]
    buckets: tuple[int, ...]
    platform: Platform
    inputs: HostBatchBuilder
    draft: ShardedModel | None = None  # --speculative draft: the draft's abstract params
    draft_cache: object = None  # None for a feature head too
    draft_cache_shape: CacheShape | None = None

    @property
    def keys(self) -> tuple:
        """Every step the engine compiles: each bucket's plain step and, with speculation, its verify one."""
        verify = tuple(verify_key(b) for b in self.buckets if b > 1) if self.inputs.proposals else ()
        return self.buckets + verify

    def keys_of(self, buckets) -> list:
        """The step keys of `buckets`, in compile order."""
        return [k for k in self.keys if key_bucket(k) in set(buckets)]

    @property
    def params(self):
        return self.model.params if self.draft is None else (self.model.params, self.draft.params)

    @property
    def caches(self):
        return self.cache if self.draft is None else (self.cache, self.draft_cache)


@dataclasses.dataclass
class BucketResult:
    bucket: int | str  # a step key: the bucket, or its verify variant
    seconds: float  # lower + compile wall time
    memory: dict[str, int]  # per device: argument, output, alias, temp, generated_code
    estimated_seconds: float | None  # the compiler's cost model
    compiled: object = dataclasses.field(repr=False)


def step_specs(
    config,
    layout,
    mesh,
    dtype,
    engine: EngineConfig,
    pages_per_shard: int,
    platform: Platform,
    draft_config=None,
    quant: QuantSpec = NONE,
) -> StepSpecs:
    """The engine's steps as abstract shapes, weights quantized by `quant`; `draft_config`: the draft model
    of --speculative draft. `pages_per_shard`: KV pages per (data, sequence) shard, i.e. per device."""
    data, sequence = mesh.shape["data"], mesh.shape["sequence"]
    pages_per_shard *= sequence  # a data shard's pages, dealt over its sequence shards (as the engine does)
    model = _abstract_model(config, layout, mesh, dtype, platform, quant)
    kv_dtype = engine.cache_dtype(dtype)
    cache_shape = _cache_shape(model, data, pages_per_shard, engine.page_size, kv_dtype)
    cache = abstract_cache(mesh, cache_shape, model.layer_loop)
    slots = engine.max_slots // data
    state = abstract_state(mesh, data, slots, config.vocab_size)
    proposals = engine.num_speculative_tokens if engine.speculative != "none" else 0
    width = page_table_width(engine.max_context, engine.page_size, sequence)
    inputs = HostBatchBuilder(data, slots, width, pages_per_shard, engine.page_size, proposals)
    buckets = token_buckets(engine.step_budget(data), platform.min_bucket, sequence)
    specs = StepSpecs(model, cache, cache_shape, state, buckets, platform, inputs)
    if draft_config is not None:
        draft_layout = plan_layout(draft_config, mesh.shape["tensor"], quiet=True)
        specs.draft = _abstract_model(draft_config, draft_layout, mesh, dtype, platform)
        if draft_config.feature_head:  # no cache (`jaxinfer.engine.head_step`)
            return specs
        specs.draft_cache_shape = _cache_shape(specs.draft, data, pages_per_shard, engine.page_size, kv_dtype)
        specs.draft_cache = abstract_cache(mesh, specs.draft_cache_shape, specs.draft.layer_loop)
    return specs


def _abstract_model(config, layout, mesh, dtype, platform: Platform, quant: QuantSpec = NONE) -> ShardedModel:
    params = abstract_params(config, layout, dtype, mesh, quant)
    model = ShardedModel(config, layout, mesh, params, dtype, quant=quant)
    return model.with_layer_loop(platform.layer_loop)  # the params layout the engine will run


def _cache_shape(model: ShardedModel, data: int, pages_per_shard: int, page_size: int, dtype: str) -> CacheShape:
    return model_cache_shape(model.config, model.layout.kv_heads, data, pages_per_shard, page_size, dtype)


def step_inputs(specs: StepSpecs, key) -> PackedInputs:
    """The engine's idle inputs for step `key`, packed, as a ShapeDtypeStruct sharded on its leading (data) axis."""
    return abstract_inputs(specs.inputs, specs.model.mesh, key)


def compile_buckets(specs: StepSpecs, buckets=None):
    """Compiles the steps of each bucket (default: all the engine uses; with speculation each bucket's
    verify variant too); yields a BucketResult per step. For a TPU target the platform's Pallas kernel
    is compiled, never interpreted."""
    draft = None
    if specs.draft is not None:
        i = specs.inputs
        draft = step_draft(
            specs.model, specs.draft, specs.draft_cache_shape, i.proposals, i.page_size, i.pages_per_shard
        )
    fn = build_step_fn(specs.model, specs.cache_shape, specs.platform, draft)
    for key in specs.keys_of(buckets or specs.buckets):
        start = time.perf_counter()
        compiled = fn.lower(specs.params, specs.caches, step_inputs(specs, key), specs.state).compile()
        seconds = time.perf_counter() - start
        yield BucketResult(key, seconds, memory_figures(compiled), estimated_seconds(compiled), compiled)


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
