"""The jitted engine step: one ragged batch of tokens through the model with a paged KV cache.

Sequence i of a data shard is its slot i (idle slots have zero query tokens). Attention runs inside
`shard_map` over (data, tensor), its specs taken from the sharding rules: each data shard sees only
its own pages and slots, each tensor shard its own KV heads, so the cache write and the attention
read never leave the device.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp

from jaxinfer.engine.sampler_state import ROW_AXES, SamplerState, state_shardings
from jaxinfer.engine.step_inputs import StepInputs
from jaxinfer.engine.xla_attention import xla_ragged_paged_attention
from jaxinfer.kv_cache import CACHE_AXES, CacheShape, cache_sharding
from jaxinfer.model.forward import ShardedModel
from jaxinfer.platform import Platform
from jaxinfer.sampling import PromptLogprobs, Samples, count_tokens, prompt_logprobs, sample
from jaxinfer.sharding import logical_sharding, logical_spec

AttentionImpl = Callable[..., jax.Array]  # ragged_paged_attention(queries, kv_pages, kv_lens, ...)

ACTIVATION_AXES = ("batch", None, "act_heads", None)  # q, k, v, out: [D, T, heads, head_dim]


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class StepOutputs:
    """What a step returns besides the cache and sampler state; the host reads back only what it needs."""

    samples: Samples  # each [D, S, ...]: one sample per slot
    prompt: PromptLogprobs  # each [D, T, ...]: per token of the step (zeros unless a request asked)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class PagedAttention:
    """Attention context writing the step's K/V into the paged cache, then reading it ragged."""

    inputs: StepInputs
    mesh: object = dataclasses.field(metadata=dict(static=True))
    impl: AttentionImpl = dataclasses.field(metadata=dict(static=True))

    def attend(self, layer, q, k, v, cache, sm_scale):
        """`layer` indexes a stacked cache; None means `cache` is this layer's own array (unrolled)."""
        x = self.inputs
        stacked = layer is not None
        act = logical_spec(ACTIVATION_AXES)
        cache_spec = logical_spec(CACHE_AXES if stacked else CACHE_AXES[1:])
        row, row3 = logical_spec(ROW_AXES), logical_spec(ROW_AXES + (None,))

        def local(layer, q, k, v, cache, write_page, write_offset, kv_lens, page_indices, cu_q_lens, num_seqs):
            t, hk, dh = k.shape[1], k.shape[2], k.shape[3]
            kv = jnp.stack([k[0], v[0]], axis=2).reshape(t, 2 * hk, dh).astype(cache.dtype)  # K,V interleaved
            at = (layer,) if stacked else ()
            cache = cache.at[at + (write_page[0], write_offset[0])].set(kv, mode="drop")
            out = self.impl(
                q[0],
                cache[layer] if stacked else cache,
                kv_lens[0],
                page_indices[0],
                cu_q_lens[0],
                num_seqs[0],
                sm_scale=sm_scale,
            )
            return out[None], cache

        fn = jax.shard_map(
            local,
            mesh=self.mesh,
            in_specs=(logical_spec(()), act, act, act, cache_spec, row, row, row, row3, row, row),
            out_specs=(act, cache_spec),
            check_vma=False,
        )
        return fn(
            layer if stacked else jnp.int32(0),
            q,
            k,
            v,
            cache,
            x.write_page,
            x.write_offset,
            x.kv_lens,
            x.page_indices,
            x.cu_q_lens,
            x.num_seqs,
        )


_traces = 0  # times a step function was traced in this process


def step_traces() -> int:
    """How often any engine step has been traced (lowered) in this process: zero on a start that loads
    every executable from disk."""
    return _traces


def build_step_fn(model: ShardedModel, cache_shape: CacheShape, platform: Platform):
    """Returns jit(step)(params, cache, inputs, state) -> (StepOutputs, cache, state).

    The cache and the sampler state are donated: XLA updates them in place and there is never a second
    copy on device.
    """
    module = model.module
    mesh = model.mesh
    impl = attention_impl(platform.attention, platform.interpret)
    vocab = model.config.vocab_size

    def step(params, cache, inputs: StepInputs, state: SamplerState):
        global _traces
        _traces += 1  # runs only while tracing
        prev = jnp.take_along_axis(state.prev_tokens, inputs.prev_slot, axis=1)
        tokens = jnp.where(inputs.use_prev, prev, inputs.tokens)
        ctx = PagedAttention(inputs, mesh, impl)
        logits, cache, prompt = module.apply(
            {"params": params},
            tokens,
            inputs.positions,
            ctx,
            cache,
            logit_indices=inputs.sample_index,
            on_hidden=lambda hidden, head: prompt_logprobs(hidden, head, inputs.prompt_targets, vocab),
        )  # logits [D, S, V]
        d, s, v = logits.shape
        flat = lambda a: a.reshape((d * s,) + a.shape[2:])
        sampling = jax.tree.map(flat, inputs.sampling)
        penalties = jax.tree.map(flat, state.penalties)
        samples = sample(logits.reshape(d * s, v), sampling, penalties)
        penalties = count_tokens(penalties, samples.tokens, sampling)
        unflat = lambda a: a.reshape((d, s) + a.shape[1:])
        samples = jax.tree.map(unflat, samples)
        state = SamplerState(samples.tokens, jax.tree.map(unflat, penalties))
        return StepOutputs(samples, prompt), cache, state

    row = output_sharding(mesh)
    outputs = StepOutputs(Samples(row, row, row, row), PromptLogprobs(row, row, row))
    return jax.jit(
        step,
        donate_argnums=(1, 3),
        out_shardings=(outputs, cache_sharding(mesh, cache_shape, model.layer_loop), state_shardings(mesh)),
    )


def output_sharding(mesh):
    """The step outputs' sharding: split over data shards in one process; replicated when the mesh spans
    processes, so process 0 reads every shard's samples from its own devices (`jaxinfer.multihost`)."""
    if jax.process_count() > 1:
        return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    return logical_sharding(mesh, ROW_AXES)


@functools.cache
def attention_impl(kind: str, interpret: bool) -> AttentionImpl:
    """'xla' -> the XLA path; 'native' -> one pass of the native CPU kernel (through the XLA path's entry
    point); 'pallas' -> the Pallas ragged paged-attention kernel (in TPU interpret mode when `interpret`)."""
    if kind == "xla":
        return xla_ragged_paged_attention
    if kind == "native":
        return functools.partial(xla_ragged_paged_attention, native=True)
    if kind == "pallas":
        from pallas_kernels.ragged_paged_attention import ragged_paged_attention

        return functools.partial(ragged_paged_attention, interpret=interpret)
    raise ValueError(f"attention {kind!r}: must be pallas, xla or native")
