"""The jitted engine step: one ragged batch of tokens through the model with a paged KV cache.

Per data shard, a step carries up to `tokens` (a bucket size) tokens: the next token of every
decoding slot and chunks of prompts being prefilled, laid out slot by slot. Sequence i of a shard is
its slot i (idle slots have zero query tokens). Attention runs inside `shard_map` over
(data, tensor): each data shard sees only its own pages and slots, each tensor shard its own KV
heads, so the cache write and the attention read never leave the device.

Tokens of decoding slots come from the previous step's sampled tokens on device (`use_prev`), so
the host can dispatch step n+1 before it has read step n's tokens back.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Callable

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from jaxinfer.engine.xla_attention import xla_ragged_paged_attention
from jaxinfer.kv_cache import CacheShape, cache_sharding
from jaxinfer.model.forward import ShardedModel
from jaxinfer.sampling import SamplingArrays, sample

AttentionImpl = Callable[..., jax.Array]  # ragged_paged_attention(queries, kv_pages, kv_lens, ...)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class StepInputs:
    """Host-built arrays of one step. D = data shards, T = token bucket, S = slots per shard, W = pages per slot."""

    tokens: jax.Array        # i32 [D, T] prompt tokens (ignored where use_prev)
    use_prev: jax.Array      # bool [D, T] take the token the previous step sampled for prev_slot
    prev_slot: jax.Array     # i32 [D, T]
    positions: jax.Array     # i32 [D, T] absolute positions; -1 for padding
    write_page: jax.Array    # i32 [D, T] shard-local page receiving this token's K/V; out of range = drop
    write_offset: jax.Array  # i32 [D, T]
    kv_lens: jax.Array       # i32 [D, S] tokens in cache per slot after this step's writes
    page_indices: jax.Array  # i32 [D, S, W] shard-local page tables
    cu_q_lens: jax.Array     # i32 [D, S + 1]
    num_seqs: jax.Array      # i32 [D, 1]
    sample_index: jax.Array  # i32 [D, S] token whose logits are sampled for each slot
    sampling: SamplingArrays  # each field [D, S]

    @classmethod
    def from_flat(cls, arrays: dict) -> "StepInputs":
        """From one flat dict holding every field, the sampling ones included (as `Engine._empty_host` builds)."""
        sampling_keys = [f.name for f in dataclasses.fields(SamplingArrays)]
        return cls(**{k: v for k, v in arrays.items() if k not in sampling_keys},
                   sampling=SamplingArrays(**{k: arrays[k] for k in sampling_keys}))


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
        act = P("data", None, "tensor", None)
        stacked = layer is not None
        cache_spec = P(None, "data", None, "tensor", None) if stacked else P("data", None, "tensor", None)
        row, row2 = P("data", None), P("data", None, None)

        def local(layer, q, k, v, cache, write_page, write_offset, kv_lens, page_indices, cu_q_lens, num_seqs):
            t, hk, dh = k.shape[1], k.shape[2], k.shape[3]
            kv = jnp.stack([k[0], v[0]], axis=2).reshape(t, 2 * hk, dh).astype(cache.dtype)  # K,V interleaved
            at = (layer,) if stacked else ()
            cache = cache.at[at + (write_page[0], write_offset[0])].set(kv, mode="drop")
            out = self.impl(q[0], cache[layer] if stacked else cache, kv_lens[0], page_indices[0], cu_q_lens[0],
                            num_seqs[0], sm_scale=sm_scale)
            return out[None], cache

        fn = jax.shard_map(local, mesh=self.mesh,
                           in_specs=(P(), act, act, act, cache_spec, row, row, row, row2, row, row),
                           out_specs=(act, cache_spec), check_vma=False)
        return fn(layer if stacked else jnp.int32(0), q, k, v, cache, x.write_page, x.write_offset, x.kv_lens,
                  x.page_indices, x.cu_q_lens, x.num_seqs)


def build_step_fn(model: ShardedModel, cache_shape: CacheShape, impl: AttentionImpl, row_sharding):
    """Returns jit(step)(params, cache, inputs, prev_tokens) -> (tokens [D,S], logprobs [D,S], cache).

    The cache is donated: XLA updates it in place and there is never a second copy on device.
    """
    module = model.module
    mesh = model.mesh

    def step(params, cache, inputs: StepInputs, prev_tokens):
        tokens = jnp.where(inputs.use_prev, jnp.take_along_axis(prev_tokens, inputs.prev_slot, axis=1),
                           inputs.tokens)
        ctx = PagedAttention(inputs, mesh, impl)
        logits, cache = module.apply({"params": params}, tokens, inputs.positions, ctx, cache,
                                     logit_indices=inputs.sample_index)  # logits [D, S, V]
        d, s, v = logits.shape
        flat = jax.tree.map(lambda a: a.reshape(d * s), inputs.sampling)
        next_tokens, logprobs = sample(logits.reshape(d * s, v), flat)
        return next_tokens.reshape(d, s), logprobs.reshape(d, s), cache

    per_layer = model.layer_loop == "unrolled"
    return jax.jit(step, donate_argnums=(1,),
                   out_shardings=(row_sharding, row_sharding, cache_sharding(mesh, cache_shape, per_layer)))


@functools.lru_cache(maxsize=None)
def attention_impl(kind: str) -> AttentionImpl:
    """'reference' -> XLA path; 'native' -> one pass of the native CPU kernel (through the XLA path's
    entry point); 'kernel' -> Pallas TPU kernel (interpret mode off TPU)."""
    if kind == "reference":
        return xla_ragged_paged_attention
    if kind == "native":
        return functools.partial(xla_ragged_paged_attention, native=True)
    if kind == "kernel":
        from pallas_kernels.ragged_paged_attention import ragged_paged_attention

        interpret = jax.devices()[0].platform != "tpu"
        return functools.partial(ragged_paged_attention, interpret=interpret)
    raise ValueError(f"--attention {kind!r}: must be kernel, native or reference")
