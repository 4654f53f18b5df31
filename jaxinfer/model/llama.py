"""Flax (Linen) Llama-class decoder: RMSNorm, RoPE, GQA/MQA attention, SwiGLU MLP, tied embeddings.

Two layer layouts, the same computation:
  * scanned (`scan_layers=True`, the checkpoint layout, TPU/GPU): layers run under `nn.scan`, so
    compile time does not grow with depth, and every layer parameter carries a leading `layers` axis;
  * unrolled (`scan_layers=False`, the CPU layout): a Python loop over `layers_0 .. layers_{L-1}`,
    each with its own arrays. XLA:CPU copies a scanned layer's weights out of the stack before every
    matmul (its dots cannot read a dynamic slice in place); separate arrays avoid that copy, and the
    KV cache is then a tuple of per-layer arrays for the same reason.
  `jaxinfer.model.params.unstack_layers` converts the first into the second.
Every parameter is declared once, here, with its logical axes (`nn.with_logical_partitioning`); shardings come from `jaxinfer.sharding.LOGICAL_RULES`.

Shapes use the physical (padded) sizes of a `ModelLayout`; see `jaxinfer.model.layout`.
"""
from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxinfer.config import ModelConfig
from jaxinfer.model.layout import ModelLayout
from jaxinfer.model.rope import apply_rope, inverse_frequencies

_INIT = nn.initializers.normal(stddev=0.02)


def _param(module: nn.Module, name: str, shape, axes, dtype, init=_INIT):
    return module.param(name, nn.with_logical_partitioning(init, axes), shape, dtype)


class RMSNorm(nn.Module):
    eps: float
    dtype: Any

    @nn.compact
    def __call__(self, x):
        scale = _param(self, "scale", (x.shape[-1],), ("norm",), self.dtype, nn.initializers.ones)
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return scale * normed.astype(self.dtype)


class Attention(nn.Module):
    config: ModelConfig
    layout: ModelLayout
    dtype: Any

    @nn.compact
    def __call__(self, x, positions, ctx, cache, layer):
        c, lay = self.config, self.layout
        e, d = c.hidden_size, c.head_dim
        wq = _param(self, "q", (e, lay.q_heads, d), ("embed", "q_heads", "head_dim"), self.dtype)
        wk = _param(self, "k", (e, lay.kv_heads, d), ("embed", "kv_heads", "head_dim"), self.dtype)
        wv = _param(self, "v", (e, lay.kv_heads, d), ("embed", "kv_heads", "head_dim"), self.dtype)
        wo = _param(self, "o", (lay.q_heads, d, e), ("q_heads", "head_dim", "embed"), self.dtype)
        # projections as plain 2-D matmuls over merged (heads, head_dim): XLA:CPU otherwise relayouts
        # the output weight before every step
        proj = lambda w: (x @ w.reshape(e, -1)).reshape(x.shape[:2] + w.shape[1:])  # noqa: E731
        q, k, v = proj(wq), proj(wk), proj(wv)  # [B, T, H, D]
        inv_freq = inverse_frequencies(c)
        q = apply_rope(q, positions, inv_freq)
        k = apply_rope(k, positions, inv_freq)
        out, cache = ctx.attend(layer, q, k, v, cache, 1.0 / math.sqrt(d))
        return out.reshape(out.shape[:2] + (-1,)) @ wo.reshape(-1, e), cache


class MLP(nn.Module):
    config: ModelConfig
    layout: ModelLayout
    dtype: Any

    @nn.compact
    def __call__(self, x):
        e, f = self.config.hidden_size, self.layout.mlp
        gate = _param(self, "gate", (e, f), ("embed", "mlp"), self.dtype)
        up = _param(self, "up", (e, f), ("embed", "mlp"), self.dtype)
        down = _param(self, "down", (f, e), ("mlp", "embed"), self.dtype)
        h = jax.nn.silu(x @ gate) * (x @ up)
        return h @ down


class DecoderLayer(nn.Module):
    config: ModelConfig
    layout: ModelLayout
    dtype: Any

    @nn.compact
    def __call__(self, carry, layer, positions, ctx):
        """`layer` indexes a stacked cache (scanned); None means `cache` is this layer's own (unrolled)."""
        x, cache = carry
        eps = self.config.rms_norm_eps
        h = RMSNorm(eps, self.dtype, name="attn_norm")(x)
        h, cache = Attention(self.config, self.layout, self.dtype, name="attn")(h, positions, ctx, cache, layer)
        x = x + h
        h = RMSNorm(eps, self.dtype, name="mlp_norm")(x)
        x = x + MLP(self.config, self.layout, self.dtype, name="mlp")(h)
        return (x, cache), None


class Llama(nn.Module):
    """tokens [B, T] int32, positions [B, T] int32 -> logits [B, T or N, vocab] float32 (+ updated cache).

    `ctx` decides how attention sees keys and values (see `jaxinfer.model.attention`). With
    `logit_indices` [B, N], only those token positions of each row are projected to the vocabulary
    (the engine samples one token per sequence; prefill needs no other logits).
    """

    config: ModelConfig
    layout: ModelLayout
    dtype: Any = jnp.float32
    scan_layers: bool = True

    @nn.compact
    def __call__(self, tokens, positions, ctx, cache=None, logit_indices=None):
        c, lay = self.config, self.layout
        table = _param(self, "embed", (lay.vocab, c.hidden_size), ("vocab", "embed"), self.dtype)
        x = jnp.take(table, tokens, axis=0)  # [B, T, E]
        if self.scan_layers:
            layers = nn.scan(
                DecoderLayer, variable_axes={"params": 0}, split_rngs={"params": True},
                in_axes=(0, nn.broadcast, nn.broadcast), length=c.num_layers,
                metadata_params={nn.PARTITION_NAME: "layers"})
            (x, cache), _ = layers(c, lay, self.dtype, name="layers")(
                (x, cache), jnp.arange(c.num_layers, dtype=jnp.int32), positions, ctx)
        else:
            caches = []
            for i in range(c.num_layers):
                (x, layer_cache), _ = DecoderLayer(c, lay, self.dtype, name=f"layers_{i}")(
                    (x, None if cache is None else cache[i]), None, positions, ctx)
                caches.append(layer_cache)
            cache = None if cache is None else tuple(caches)
        x = RMSNorm(c.rms_norm_eps, self.dtype, name="final_norm")(x)
        if logit_indices is not None:
            x = jnp.take_along_axis(x, logit_indices[..., None], axis=1)  # [B, N, E]
        if c.tie_embeddings:
            head = table.T
        else:
            head = _param(self, "lm_head", (c.hidden_size, lay.vocab), ("embed", "vocab"), self.dtype)
        logits = jnp.einsum("bte,ev->btv", x, head, preferred_element_type=jnp.float32)
        return logits[..., :c.vocab_size], cache
