"""The paged attention context of the engine's steps: a layer's K/V written into the paged cache (quantized
on write for an int8 or fp8 cache), then read ragged by the attention kernel.

Sequence i of a data shard is its slot i (idle slots have zero query tokens). Attention runs inside
`shard_map` over (data, sequence, tensor), its specs taken from the sharding rules: each data shard sees
only its own slots, each tensor shard its own KV heads.

Sequence parallelism (a mesh with `sequence` S > 1). A data shard's pages are dealt round-robin over its
S sequence shards (page j of a request lives on shard j % S, `jaxinfer.engine.pages`), and the step's
tokens arrive split over them (the projections and the MLP ran on T / S tokens per shard). Each shard
gathers the step's queries and K/V, writes the tokens whose pages it holds, and attends every query to
the keys in its own pages only: its local page table is columns s, s + S, ... of each slot's table, and
the kernel maps local key x to absolute position ((x // page) * S + s) * page + x % page for the causal
mask. Each shard returns its partial result and log-sum-exp; the exact merge over the sequence axis
(`pallas_kernels.ragged_paged_attention.merge`) gives every shard the full attention, of which it keeps
its own tokens. So one request holds S times the context, and the cache's bytes per device fall by S.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax import lax

from jaxinfer.engine.sampler_state import ROW_AXES
from jaxinfer.engine.step_inputs import StepInputs
from jaxinfer.kv_cache import CACHE_AXES
from jaxinfer.sharding import logical_spec
from pallas_kernels.ragged_paged_attention.merge import merge_over_axis
from pallas_kernels.ragged_paged_attention.quantized import write_tokens

AttentionImpl = Callable[..., jax.Array]  # ragged_paged_attention(queries, kv_pages, kv_lens, ...)

ACTIVATION_AXES = ("batch", "length", "act_heads", None)  # q, k, v, out: [D, T, heads, head_dim]


def shard_pages(page_table, write_page, pages: int, shards: int, index):
    """Sequence shard `index`'s view of a data shard's page ids (0 .. shards * pages - 1, block s on shard
    s): its columns of the page tables [S, W] -> [S, W / shards], and the writes' pages [T], as ids local to
    its `pages`; writes to pages it does not hold become `pages` (dropped)."""
    n, w = page_table.shape
    base = index * pages
    mine = lax.dynamic_index_in_dim(page_table.reshape(n, w // shards, shards), index, axis=2, keepdims=False)
    local = write_page - base
    return jnp.clip(mine - base, 0, pages - 1), jnp.where((local >= 0) & (local < pages), local, pages)


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
        shards = self.mesh.shape["sequence"]

        def local(layer, q, k, v, cache, write_page, write_offset, kv_lens, page_indices, cu_q_lens, num_seqs):
            page_table, write_page, split = page_indices[0], write_page[0], {}
            if shards > 1:  # every shard sees the step's tokens; each holds its own pages
                q, k, v = (lax.all_gather(a, "sequence", axis=1, tiled=True) for a in (q, k, v))
                index = lax.axis_index("sequence")
                pages = cache.shape[1 if stacked else 0]
                page_table, write_page = shard_pages(page_table, write_page, pages, shards, index)
                split = dict(sequence_shards=shards, sequence_index=index[None].astype(jnp.int32), return_lse=True)
            t, hk, dh = k.shape[1], k.shape[2], k.shape[3]
            kv = jnp.stack([k[0], v[0]], axis=2).reshape(t, 2 * hk, dh)  # K,V interleaved
            at = (layer,) if stacked else ()
            cache = write_tokens(cache, write_page, write_offset[0], kv, prefix=at)  # quantized as the cache is
            out = self.impl(
                q[0],
                cache[layer] if stacked else cache,
                kv_lens[0],
                page_table,
                cu_q_lens[0],
                num_seqs[0],
                sm_scale=sm_scale,
                **split,
            )
            if shards > 1:  # the exact merge of the shards' partial results; this shard keeps its tokens
                out = merge_over_axis(*out, "sequence").astype(q.dtype)
                out = lax.dynamic_slice_in_dim(out, index * (t // shards), t // shards, axis=0)
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
