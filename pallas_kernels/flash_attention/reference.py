"""Dense-softmax reference for `flash_attention` (the oracle its kernel is tested against).

q [B, T, Hq, D], k/v [B, S, Hk, D]; query i of batch b is at position ``q_offset[b] + i``
(0 when q_offset is None) and, if causal, sees kv positions ``<=`` that; kv positions
past the last query's are never used. GQA: q head n
uses kv head ``n // (Hq // Hk)``. Computed in float32, returned in q's dtype.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp


@functools.partial(jax.jit, static_argnames=("sm_scale", "causal"))  # one compile, not one per op
def flash_attention_reference(q, k, v, *, sm_scale: float, causal: bool = True, q_offset=None):
    B, T, Hq, D = q.shape
    S, Hk = k.shape[1], k.shape[2]
    G = Hq // Hk
    qf = q.astype(jnp.float32).reshape(B, T, Hk, G, D)
    s = (
        jnp.einsum("btkgd,bskd->bkgts", qf, k.astype(jnp.float32), precision=jax.lax.Precision.HIGHEST) * sm_scale
    )  # [B, Hk, G, T, S]
    if causal:
        off = jnp.zeros((B,), jnp.int32) if q_offset is None else q_offset
        qpos = off[:, None] + jnp.arange(T)[None, :]  # [B, T]
        ok = jnp.arange(S)[None, None, :] <= qpos[:, :, None]  # [B, T, S]
        s = jnp.where(ok[:, None, None], s, -jnp.inf)
        # Positions no query can see are dropped from V too, so garbage there (even NaN)
        # cannot leak through 0 * NaN.
        seen = jnp.arange(S)[None, :] <= qpos[:, -1:]  # [B, S]
        v = jnp.where(seen[:, :, None, None], v, 0)
    p = jax.nn.softmax(s, axis=-1)
    o = jnp.einsum("bkgts,bskd->btkgd", p, v.astype(jnp.float32), precision=jax.lax.Precision.HIGHEST)
    return o.reshape(B, T, Hq, D).astype(q.dtype)
