"""The paged attention context of the engine's steps: a layer's K/V written into the paged cache (quantized
on write for an int8 or fp8 cache), then read ragged by the attention kernel.

Sequence i of a data shard is its slot i (idle slots have zero query tokens). Attention runs inside
`shard_map` over (data, tensor), its specs taken from the sharding rules: each data shard sees only
its own pages and slots, each tensor shard its own KV heads, so the cache write and the attention
read never leave the device.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp

from jaxinfer.engine.sampler_state import ROW_AXES
from jaxinfer.engine.step_inputs import StepInputs
from jaxinfer.kv_cache import CACHE_AXES
from jaxinfer.sharding import logical_spec
from pallas_kernels.ragged_paged_attention.quantized import write_tokens

AttentionImpl = Callable[..., jax.Array]  # ragged_paged_attention(queries, kv_pages, kv_lens, ...)

ACTIVATION_AXES = ("batch", None, "act_heads", None)  # q, k, v, out: [D, T, heads, head_dim]


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
            kv = jnp.stack([k[0], v[0]], axis=2).reshape(t, 2 * hk, dh)  # K,V interleaved
            at = (layer,) if stacked else ()
            cache = write_tokens(cache, write_page[0], write_offset[0], kv, prefix=at)  # quantized as the cache is
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
