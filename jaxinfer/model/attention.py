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

from jaxinfer.sharding import logical_spec

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
    With `kernel` (and a `mesh`), attention runs as the Pallas flash attention kernel inside
    `shard_map` over (data, tensor) (TPU interpret mode off TPU); the kernel masks by token index,
    so it requires each row's positions to be 0, 1, ..., n-1 followed only by padding.
    """

    positions: jax.Array
    mesh: object = dataclasses.field(default=None, metadata=dict(static=True))
    kernel: bool = dataclasses.field(default=False, metadata=dict(static=True))
    interpret: bool = dataclasses.field(default=True, metadata=dict(static=True))  # TPU interpret mode

    def attend(self, layer, q, k, v, cache, sm_scale):
        del layer
        if self.kernel:
            return flash_attention_sharded(self.mesh, q, k, v, sm_scale, self.interpret), cache
        pos = self.positions
        valid = pos >= 0
        mask = (pos[:, None, :] <= pos[:, :, None]) & valid[:, None, :]
        return dense_attention(q, k, v, mask, sm_scale), cache


def flash_attention_sharded(mesh, q, k, v, sm_scale: float, interpret: bool):
    """Pallas flash attention per (data, tensor) shard: rows split over data, heads over tensor."""
    from pallas_kernels.flash_attention import flash_attention

    spec = logical_spec(("batch", None, "act_heads", None))
    fn = jax.shard_map(
        lambda q, k, v: flash_attention(q, k, v, sm_scale=sm_scale, causal=True, interpret=interpret),
        mesh=mesh,
        in_specs=(spec, spec, spec),
        out_specs=spec,
        check_vma=False,
    )
    return fn(q, k, v)
