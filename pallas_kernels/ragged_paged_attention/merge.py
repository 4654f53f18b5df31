"""Exact merge of attention computed over disjoint parts of each query's keys (sequence parallelism).

Each part gives `out` (attention normalised over its own keys, float32) and `lse` (the log of the sum of
exp(score) over those keys; -inf where the part has no key for the row). The whole-key attention is

    out = sum_s exp(lse_s - M) out_s / sum_s exp(lse_s - M),   M = max_s lse_s,

subtracting M so no exponent overflows. A row no part has a key for (padding) comes out 0, never NaN.
"""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax


def _weights(lse, top):
    finite = jnp.isfinite(top)
    return jnp.where(finite, jnp.exp(lse - jnp.where(finite, top, 0.0)), 0.0)


def merge_partials(outs, lses):
    """outs [S, T, Hq, D], lses [S, T, Hq] (the parts stacked on axis 0) -> [T, Hq, D] float32."""
    w = _weights(lses, jnp.max(lses, axis=0))
    den = jnp.sum(w, axis=0)
    num = jnp.sum(w[..., None] * outs.astype(jnp.float32), axis=0)
    return num / jnp.where(den > 0, den, 1.0)[..., None]


def merge_over_axis(out, lse, axis_name):
    """The same merge inside `shard_map`, one part per shard of the mesh axis `axis_name`: out [T, Hq, D],
    lse [T, Hq] -> [T, Hq, D] float32, equal on every shard of the axis."""
    w = _weights(lse, lax.pmax(lse, axis_name))
    den = lax.psum(w, axis_name)
    num = lax.psum(w[..., None] * out.astype(jnp.float32), axis_name)
    return num / jnp.where(den > 0, den, 1.0)[..., None]
