"""Causal, GQA-aware blockwise (flash) attention as a Pallas TPU kernel, for long prefill.

``flash_attention(q [B, T, Hq, D], k [B, S, Hk, D], v [B, S, Hk, D])`` -> [B, T, Hq, D].
Query i of batch b sits at absolute position ``q_offset[b] + i`` and, when ``causal``,
attends to kv positions ``<=`` that (``q_offset=None`` means 0: q and kv start together).

Design
------
* The wrapper regroups heads so a kv head's G = Hq/Hk query heads form one dense matrix:
  q -> [B, Hk, T*G, D] (row ``t*G + g``), k/v -> [B, Hk, S, D]. Every block is then a plain
  2-D [rows, D] tile (legal for any head count and head_dim), and GQA costs one MXU
  matmul per block instead of G. T and S are zero-padded to block multiples.
* Grid ``(B, Hk, T/block_q, S/block_kv)``; the last axis is the online-softmax reduction
  ("arbitrary"), the others are "parallel". BlockSpecs let Pallas double-buffer the q/k/v
  tiles HBM->VMEM automatically.
* Causal block skipping: ``q_offset`` is scalar-prefetched, and the k/v index maps clamp
  the kv block index to the last block the q block can see, so blocks past the diagonal
  re-use the already-resident tile (no DMA) and their compute is skipped by ``pl.when``.
* Online softmax with f32 running max/sum (lane-replicated [rows, 128]) and an f32
  accumulator in VMEM scratch; normalised once after the last kv block. Masked scores get a
  finite large negative and exactly-zero probabilities (padding columns, causal); V rows
  no query of the block may see are zeroed, so garbage (even NaN) past the visible range
  of a partially visible tile cannot leak through 0 * NaN.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

_MASK = -1e30
_LANES = 128


def _round_up(x, m):
    return (x + m - 1) // m * m


def _kernel(
    off_ref,  # SMEM i32[B] (prefetched q_offset)
    q_ref,  # [R, D]  R = block_q * G rows
    k_ref,
    v_ref,  # [block_kv, D]
    o_ref,  # [R, D]
    m_ref,
    l_ref,  # [R, 128] f32
    acc_ref,  # [R, D] f32
    *,
    G,
    bq,
    bk,
    q_len,
    kv_len,
    causal,
    sm_scale,
):
    b, qi, ki = pl.program_id(0), pl.program_id(2), pl.program_id(3)
    R = q_ref.shape[0]
    off = off_ref[b]
    q_hi = off + jnp.minimum((qi + 1) * bq, q_len) - 1  # last real query position
    last = q_hi // bk if causal else pl.num_programs(3) - 1

    @pl.when(ki == 0)
    def _():
        m_ref[...] = jnp.full(m_ref.shape, _MASK, jnp.float32)
        l_ref[...] = jnp.zeros(l_ref.shape, jnp.float32)
        acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)

    @pl.when(ki <= last)
    def _():
        col = ki * bk + lax.broadcasted_iota(jnp.int32, (R, bk), 1)
        ok = col < kv_len
        if causal:
            pos = off + qi * bq + lax.broadcasted_iota(jnp.int32, (R, bk), 0) // G
            ok &= col <= pos
        s = (
            lax.dot_general(q_ref[...], k_ref[...], (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
            * sm_scale
        )  # [R, bk]
        s = jnp.where(ok, s, _MASK)
        m_prev = m_ref[...]
        m_new = jnp.maximum(m_prev, jnp.max(s, axis=1, keepdims=True))
        p = jnp.where(ok, jnp.exp(s - m_new[:, :1]), 0.0)
        alpha = jnp.exp(m_prev - m_new)
        l_ref[...] = alpha * l_ref[...] + jnp.sum(p, axis=1, keepdims=True)
        m_ref[...] = m_new
        v = v_ref[...]  # zero rows nobody in this q block may see (padding / beyond the diagonal)
        vcol = ki * bk + lax.broadcasted_iota(jnp.int32, (bk, 1), 0)
        vok = vcol < kv_len
        if causal:
            vok &= vcol <= q_hi
        v = jnp.where(vok, v, jnp.zeros_like(v))
        acc_ref[...] = acc_ref[...] * alpha[:, :1] + jnp.dot(p.astype(v.dtype), v, preferred_element_type=jnp.float32)

    @pl.when(ki == pl.num_programs(3) - 1)
    def _():
        l = l_ref[...][:, :1]
        o_ref[...] = jnp.where(l > 0, acc_ref[...] / l, 0.0).astype(o_ref.dtype)


@functools.partial(jax.jit, static_argnames=("sm_scale", "causal", "block_q", "block_kv", "interpret"))
def flash_attention(
    q,
    k,
    v,
    *,
    sm_scale: float,
    causal: bool = True,
    q_offset=None,
    block_q: int | None = None,
    block_kv: int | None = None,
    interpret=False,
):
    """q [B, T, Hq, D], k/v [B, S, Hk, D], q_offset None or i32[B] -> [B, T, Hq, D].

    Defaults: block_kv = 512 kv tokens, block_q = 512 // G tokens (about 512 query rows
    per block, enough to keep the MXU busy while a 512x128 K tile is resident), both
    capped by the (padded) sequence lengths. block_q*G and block_kv must be multiples of
    the sublane tile (8 for 32-bit, 16 for 16-bit dtypes) unless they cover everything.
    ``interpret``: False, True (TPU interpret mode) or a `pltpu.InterpretParams`.
    """
    B, T, Hq, D = q.shape
    _, S, Hk, _ = k.shape
    if k.shape != v.shape or k.shape[0] != B or k.shape[3] != D or Hq % Hk:
        raise ValueError(f"bad shapes q {q.shape} k {k.shape} v {v.shape}")
    G = Hq // Hk
    tile = 8 * (4 // jnp.dtype(q.dtype).itemsize)
    bk = block_kv or min(512, _round_up(S, tile))
    bq = block_q or min(max(1, 512 // G), _round_up(T, tile))
    if (bq * G) % tile or bk % tile:
        raise ValueError(f"block_q*G={bq * G} and block_kv={bk} must be multiples of {tile}")
    Tp, Sp = _round_up(T, bq), _round_up(S, bk)
    n_q, n_kv = Tp // bq, Sp // bk
    R = bq * G

    qh = jnp.pad(q, ((0, 0), (0, Tp - T), (0, 0), (0, 0)))
    qh = qh.reshape(B, Tp, Hk, G, D).transpose(0, 2, 1, 3, 4).reshape(B, Hk, Tp * G, D)
    kh = jnp.pad(k, ((0, 0), (0, Sp - S), (0, 0), (0, 0))).transpose(0, 2, 1, 3)
    vh = jnp.pad(v, ((0, 0), (0, Sp - S), (0, 0), (0, 0))).transpose(0, 2, 1, 3)
    off = jnp.zeros((B,), jnp.int32) if q_offset is None else q_offset.astype(jnp.int32)

    def kv_map(b, h, i, j, off_ref):
        if causal:  # past the diagonal: revisit the last visible block (no new DMA)
            q_hi = off_ref[b] + jnp.minimum((i + 1) * bq, T) - 1
            j = jnp.minimum(j, jnp.minimum(q_hi // bk, n_kv - 1))
        return (b, h, j, 0)

    qspec = pl.BlockSpec((None, None, R, D), lambda b, h, i, j, _: (b, h, i, 0))
    kvspec = pl.BlockSpec((None, None, bk, D), kv_map)
    if interpret is True:
        interpret = pltpu.InterpretParams()
    frac = 0.5 if causal else 1.0  # causal does about half the work
    itm = q.dtype.itemsize
    cost = pl.CostEstimate(
        flops=int(4 * B * Hq * T * S * D * frac),
        transcendentals=int(B * Hq * T * S * frac),
        bytes_accessed=(2 * qh.size + (kh.size + vh.size) * max(1, int(n_q * frac))) * itm,
    )
    out = pl.pallas_call(
        functools.partial(_kernel, G=G, bq=bq, bk=bk, q_len=T, kv_len=S, causal=causal, sm_scale=sm_scale),
        out_shape=jax.ShapeDtypeStruct(qh.shape, q.dtype),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=1,
            grid=(B, Hk, n_q, n_kv),
            in_specs=[qspec, kvspec, kvspec],
            out_specs=qspec,
            scratch_shapes=[
                pltpu.VMEM((R, _LANES), jnp.float32),
                pltpu.VMEM((R, _LANES), jnp.float32),
                pltpu.VMEM((R, D), jnp.float32),
            ],
        ),
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "parallel", "arbitrary")),
        interpret=interpret,
        cost_estimate=cost,
        name="flash_attention",
    )(off, qh, kh, vh)
    out = out.reshape(B, Hk, Tp, G, D).transpose(0, 2, 1, 3, 4).reshape(B, Tp, Hq, D)
    return out[:, :T]
