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


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class PagedAttention:
    """Attention context writing the step's K/V into the paged cache, then reading it ragged."""

    inputs: StepInputs
    mesh: object = dataclasses.field(metadata=dict(static=True))
    impl: AttentionImpl = dataclasses.field(metadata=dict(static=True))

    def attend(self, layer, q, k, v, cache, sm_scale):
        x = self.inputs
        act = P("data", None, "tensor", None)
        cache_spec = P(None, "data", None, "tensor", None)
        row, row2 = P("data", None), P("data", None, None)

        def local(layer, q, k, v, cache, write_page, write_offset, kv_lens, page_indices, cu_q_lens, num_seqs):
            t, hk, dh = k.shape[1], k.shape[2], k.shape[3]
            kv = jnp.stack([k[0], v[0]], axis=2).reshape(t, 2 * hk, dh).astype(cache.dtype)  # K,V interleaved
            cache = cache.at[layer, write_page[0], write_offset[0]].set(kv, mode="drop")
            out = self.impl(q[0], cache[layer], kv_lens[0], page_indices[0], cu_q_lens[0], num_seqs[0],
                            sm_scale=sm_scale)
            return out[None], cache

        fn = jax.shard_map(local, mesh=self.mesh,
                           in_specs=(P(), act, act, act, cache_spec, row, row, row, row2, row, row),
                           out_specs=(act, cache_spec), check_vma=False)
        return fn(layer, q, k, v, cache, x.write_page, x.write_offset, x.kv_lens, x.page_indices,
                  x.cu_q_lens, x.num_seqs)


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

    return jax.jit(step, donate_argnums=(1,), out_shardings=(row_sharding, row_sharding, cache_sharding(mesh, cache_shape)))


def xla_ragged_paged_attention(queries, kv_pages, kv_lens, page_indices, cu_q_lens, num_seqs, *, sm_scale):
    """Ragged paged attention in plain XLA ops (the CPU/GPU path); same semantics as the kernel.

    Online softmax over the pages of each token's own sequence, one page per loop iteration, for
    only as many pages as the longest live context needs (a dynamic trip count, so short contexts
    are cheap and nothing recompiles). Work is proportional to tokens x context, never to
    slots x max_context. queries [T, Hq, D]; kv_pages [P, page, 2Hk, D] (K, V interleaved).
    """
    t, hq, dh = queries.shape
    s = page_indices.shape[0]
    page = kv_pages.shape[1]
    hk = kv_pages.shape[2] // 2
    tok = jnp.arange(t)
    seq = jnp.clip(jnp.searchsorted(cu_q_lens, tok, side="right") - 1, 0, s - 1)  # [T]
    q_len = cu_q_lens[seq + 1] - cu_q_lens[seq]
    live = tok < cu_q_lens[num_seqs[0]]
    pos = jnp.where(live, kv_lens[seq] - q_len + (tok - cu_q_lens[seq]), -1)  # [T] absolute position
    q = queries.reshape(t, hk, hq // hk, dh).astype(jnp.float32) * sm_scale

    def one_page(i, carry):
        m, l, acc = carry  # running max / sum [T, Hk, G], accumulator [T, Hk, G, D]
        kv = kv_pages[page_indices[seq, i]].astype(jnp.float32)  # [T, page, 2Hk, D]
        k, v = kv[:, :, 0::2], kv[:, :, 1::2]
        scores = jnp.einsum("thgd,tphd->thgp", q, k)
        visible = (i * page + jnp.arange(page))[None, :] <= pos[:, None]  # [T, page]
        scores = jnp.where(visible[:, None, None, :], scores, -jnp.inf)
        v = jnp.where(visible[:, :, None, None], v, 0.0)  # pages past a token's context may hold garbage
        m_new = jnp.maximum(m, scores.max(axis=-1))
        shift = jnp.where(jnp.isneginf(m_new), 0.0, m_new)
        p = jnp.exp(scores - shift[..., None])
        scale = jnp.exp(m - shift)
        return m_new, l * scale + p.sum(-1), acc * scale[..., None] + jnp.einsum("thgp,tphd->thgd", p, v)

    pages = (jnp.max(pos) + page) // page  # pages holding positions 0..max(pos)
    init = (jnp.full((t, hk, hq // hk), -jnp.inf), jnp.zeros((t, hk, hq // hk)), jnp.zeros((t, hk, hq // hk, dh)))
    _, l, acc = jax.lax.fori_loop(0, pages, one_page, init)
    out = jnp.where(live[:, None, None, None], acc / jnp.maximum(l, 1e-30)[..., None], 0.0)
    return out.reshape(t, hq, dh).astype(queries.dtype)


@functools.lru_cache(maxsize=None)
def attention_impl(kind: str) -> AttentionImpl:
    """'reference' -> XLA path; 'kernel' -> Pallas TPU kernel (interpret mode off TPU)."""
    if kind == "reference":
        return xla_ragged_paged_attention
    if kind == "kernel":
        from pallas_kernels.ragged_paged_attention import ragged_paged_attention

        interpret = jax.devices()[0].platform != "tpu"
        return functools.partial(ragged_paged_attention, interpret=interpret)
    raise ValueError(f"--attention {kind!r}: must be auto, kernel or reference")
