"""On-device verification of speculative proposals: K+1 samples per speculating slot, and how many of
its proposals the target accepts.

A speculating slot runs a window of tokens [x0, x1 .. xk] in one step: x0 its last accepted token,
x1..xk proposals (an n-gram continuation, or the draft model's greedy tokens). The target's logits at
window offset j give its distribution p_j over the token after x_j. Proposals are deterministic, so
the standard rejection rule (accept x_{j+1} with probability min(1, p_j(x) / q_j(x)) = p_j(x), else
draw from the residual (p_j - q_j)+ renormalised, i.e. p_j without x) is the same as drawing
y_j ~ p_j with the key of its position and accepting x_{j+1} iff y_j == x_{j+1}: at the first
mismatch y_j is a draw from p_j conditioned on y_j != x_{j+1}, the residual. So every window offset is
sampled exactly as the plain step samples that position (`jaxinfer.sampling.sample`, key
fold_in(seed, position)), the slot keeps y_0 .. y_a where a counts the leading matches, and the
output is token for token what decoding without speculation gives for the same seed, greedy or not.

Sample rows: row s (< S) is slot s's first window offset (every sampling slot has one, and only these
rows see penalties: penalized requests never speculate); rows S .. S+E-1 are the extra offsets of
speculating slots, each naming its slot and offset.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from jaxinfer.sampling import SamplingArrays


def extra_row_sampling(rows: SamplingArrays, offset: jax.Array) -> SamplingArrays:
    """Sampling arrays of the extra rows [D, E] from their slots' (`rows`, gathered by the caller): at the
    offset's position, unpenalized."""
    return dataclasses.replace(rows, position=rows.position + offset, penalized=jnp.zeros_like(rows.penalized))


def accepted_counts(tokens: jax.Array, window_rows: jax.Array, proposals: jax.Array) -> tuple[jax.Array, jax.Array]:
    """tokens i32 [D, R] sampled per row; window_rows i32 [D, S, K+1] (row of each window offset, -1 =
    none); proposals i32 [D, S, K] -> (accepted i32 [D, S]: leading proposals equal to the target's
    samples, the slot's last token i32 [D, S]: its sample at window offset `accepted`)."""
    d, s, w = window_rows.shape
    picked = jnp.take_along_axis(tokens, jnp.maximum(window_rows, 0).reshape(d, s * w), axis=1).reshape(d, s, w)
    if w == 1:
        return jnp.zeros((d, s), jnp.int32), picked[..., 0]
    match = (picked[..., :-1] == proposals) & (window_rows[..., 1:] >= 0)
    accepted = jnp.sum(jnp.cumprod(match.astype(jnp.int32), axis=-1), axis=-1)
    return accepted, jnp.take_along_axis(picked, accepted[..., None], axis=-1)[..., 0]
