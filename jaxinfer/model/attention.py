"""Attention contexts: how a layer's attention reads and writes keys and values.

The model calls `ctx.attend(layer, q, k, v, cache)` and does not know whether attention is a dense
causal pass over the tokens it was given (`DenseCausal`: parity tests, scoring) or a paged KV cache
read by the engine (`jaxinfer.engine` defines that context). Contexts are pytrees, so their arrays
flow through `jit` and `scan` while their kind stays static.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)


def dense_attention(q, k, v, mask, sm_scale: float):
    """Softmax attention with GQA.

    q: [B, T, Hq, D]; k, v: [B, S, Hk, D]; mask: [B, T, S] (True = may attend). Returns [B, T, Hq, D].
    Scores and softmax in float32; probabilities cast to v's dtype for the value product (as HF does).
    """
    b, t, hq, d = q.shape
    hk = k.shape[2]
    qg = q.reshape(b, t, hk, hq // hk, d)
    scores = jnp.einsum("bthgd,bshd->bhgts", qg, k, preferred_element_type=jnp.float32) * sm_scale
    scores = jnp.where(mask[:, None, None], scores, MASK_VALUE)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum("bhgts,bshd->bthgd", probs, v, preferred_element_type=jnp.float32)
    return out.reshape(b, t, hq, d).astype(q.dtype)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class DenseCausal:
    """Causal attention among the tokens of each row; no KV cache.

    positions: int32 [B, T], the absolute position of each token; -1 marks padding (attends and is
    attended by nothing meaningful; its output is garbage-but-finite and must be ignored).
    """

    positions: jax.Array

    def attend(self, layer, q, k, v, cache, sm_scale):
        del layer
        pos = self.positions
        valid = pos >= 0
        mask = (pos[:, None, :] <= pos[:, :, None]) & valid[:, None, :]
        return dense_attention(q, k, v, mask, sm_scale), cache
