"""Checks of ragged paged attention's static inputs (shapes, dtypes and the static keyword arguments), run
at trace time by the kernel, the reference and the XLA path alike.

The checks of JAX's `static_validate_inputs` (jax.experimental.pallas.ops.tpu.ragged_paged_attention),
each a ValueError naming the argument, its value and the limit, plus ours: query and KV dtypes, int8 page
rows, k/v scales that are positive finite floats, and the sequence-shard arguments (`sequence_shards` an
int >= 1, `sequence_index` None or int32 [1]). Example: `soft_cap=0.0` is refused; it would turn
every score into 0 * tanh(s / 0) and attention into a uniform average.
"""

from __future__ import annotations

import math
import numbers

import jax.numpy as jnp

from pallas_kernels.ragged_paged_attention.quantized import KV_DTYPES, is_int8, page_size_of

QUERY_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16))


def validate_static(
    queries,  # [T, Hq, D]
    kv_pages,  # [P, rows, 2*Hk, D]
    kv_lens,  # i32[S]
    page_indices,  # i32[S, pages_per_seq]
    cu_q_lens,  # i32[S+1]
    num_seqs,  # i32[1]
    *,
    sliding_window: int | None = None,
    soft_cap: float | None = None,
    k_scale: float | None = None,
    v_scale: float | None = None,
    num_kv_pages_per_block: int | None = None,
    num_queries_per_block: int | None = None,
    vmem_limit_bytes: int | None = None,
    sequence_shards: int = 1,
    sequence_index=None,
) -> None:
    if queries.ndim != 3 or kv_pages.ndim != 4:
        raise ValueError(f"queries {queries.shape} must be [T, Hq, D] and kv_pages {kv_pages.shape} [P, page, 2*Hk, D]")
    _, hq, d = queries.shape
    _, _, c, dk = kv_pages.shape
    if c % 2:
        raise ValueError(f"kv_pages {kv_pages.shape}: combined kv heads {c} must be even (K and V interleaved)")
    if dk != d:
        raise ValueError(f"kv_pages head_dim {dk} must equal the queries' head_dim {d}")
    if hq % (c // 2):
        raise ValueError(f"num_q_heads {hq} must be a multiple of num_kv_heads {c // 2}")
    if page_indices.ndim != 2:
        raise ValueError(f"page_indices {page_indices.shape} must be [max_num_seqs, pages_per_seq]")
    s, pages_per_seq = page_indices.shape
    if kv_lens.shape != (s,):
        raise ValueError(f"kv_lens {kv_lens.shape} must be ({s},): one per page_indices row")
    if cu_q_lens.shape != (s + 1,):
        raise ValueError(f"cu_q_lens {cu_q_lens.shape} must be ({s + 1},): page_indices rows + 1")
    if num_seqs.shape != (1,):
        raise ValueError(f"num_seqs {num_seqs.shape} must be (1,)")
    for name, a in (
        ("kv_lens", kv_lens),
        ("page_indices", page_indices),
        ("cu_q_lens", cu_q_lens),
        ("num_seqs", num_seqs),
    ):
        if a.dtype != jnp.int32:
            raise ValueError(f"{name} dtype {a.dtype} must be int32")
    if jnp.dtype(queries.dtype) not in QUERY_DTYPES:
        raise ValueError(f"queries dtype {queries.dtype} must be float32 or bfloat16")
    if jnp.dtype(kv_pages.dtype) not in KV_DTYPES:
        raise ValueError(f"kv_pages dtype {kv_pages.dtype} must be one of {', '.join(str(t) for t in KV_DTYPES)}")
    if is_int8(kv_pages.dtype):
        page_size_of(kv_pages)  # raises when the rows are no page_size + scale trailer
        if d % 4:
            raise ValueError(f"int8 kv_pages: head_dim {d} must be a multiple of 4 (a scale's bytes share a row)")
    if sliding_window is not None and (not isinstance(sliding_window, numbers.Integral) or sliding_window <= 0):
        raise ValueError(f"sliding_window={sliding_window!r} must be a positive int or None")
    if soft_cap is not None and (soft_cap == 0.0 or not math.isfinite(soft_cap)):
        raise ValueError(f"soft_cap={soft_cap!r} must be nonzero and finite, or None (0.0 is not 'no cap')")
    for name, scale in (("k_scale", k_scale), ("v_scale", v_scale)):
        if scale is not None and (not isinstance(scale, float) or not math.isfinite(scale) or scale <= 0):
            raise ValueError(f"{name}={scale!r} must be a positive finite float or None")
    if num_kv_pages_per_block is not None and not 0 < num_kv_pages_per_block <= pages_per_seq:
        raise ValueError(f"num_kv_pages_per_block={num_kv_pages_per_block} must be in (0, {pages_per_seq}]")
    if num_queries_per_block is not None and num_queries_per_block <= 0:
        raise ValueError(f"num_queries_per_block={num_queries_per_block} must be positive")
    if vmem_limit_bytes is not None and vmem_limit_bytes <= 0:
        raise ValueError(f"vmem_limit_bytes={vmem_limit_bytes} must be positive")
    if not isinstance(sequence_shards, numbers.Integral) or isinstance(sequence_shards, bool) or sequence_shards < 1:
        raise ValueError(f"sequence_shards={sequence_shards!r} must be an int >= 1")
    if sequence_index is not None and (
        getattr(sequence_index, "shape", None) != (1,) or getattr(sequence_index, "dtype", None) != jnp.int32
    ):
        shape, dtype = getattr(sequence_index, "shape", None), getattr(sequence_index, "dtype", type(sequence_index))
        raise ValueError(f"sequence_index (shape {shape}, dtype {dtype}) must be an int32 array of shape (1,) or None")
