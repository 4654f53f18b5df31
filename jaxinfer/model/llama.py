"""Flax (Linen) Llama-class decoder: RMSNorm, RoPE, GQA/MQA attention, SwiGLU MLP, tied embeddings.

Two layer layouts, the same computation:
  * scanned (`scan_layers=True`, the checkpoint layout, TPU/GPU): layers run under `nn.scan`, so
    compile time does not grow with depth, and every layer parameter carries a leading `layers` axis;
  * unrolled (`scan_layers=False`, the CPU layout): a Python loop over `layers_0 .. layers_{L-1}`,
    each with its own arrays. XLA:CPU copies a scanned layer's weights out of the stack before every
    matmul (its dots cannot read a dynamic slice in place); separate arrays avoid that copy, and the
    KV cache is then a tuple of per-layer arrays for the same reason. Its projection weights are
    stored output-major ([out, in], see `OUT_MAJOR`), and steps of at most `FEATURE_MAJOR_TOKENS`
    tokens per row run feature-major: activations [features, B*T], every projection `W[out, in] @ x`.
    XLA:CPU's dots for a few dozen tokens are 15-40% faster that way than `x @ W[in, out]`; longer
    steps stay token-major (`x @ W[out, in].T`, as fast as before).
  `jaxinfer.model.params.unstack_layers` converts the first into the second.
Every parameter is declared once, here, with its logical axes (`nn.with_logical_partitioning`);
shardings come from `jaxinfer.sharding.LOGICAL_RULES`.

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
FEATURE_MAJOR_TOKENS = 64  # unrolled layout: steps of at most this many tokens per row run feature-major
# projection weights of the unrolled layout: the permutation from the declared [in..., out...] order
# to the stored [out..., in...] order (the reverse moves the last `inputs` axes to the front)
OUT_MAJOR = {"q": (1, 2, 0), "k": (1, 2, 0), "v": (1, 2, 0), "o": (2, 0, 1), "gate": (1, 0), "up": (1, 0),
             "down": (1, 0)}


def _param(module: nn.Module, name: str, shape, axes, dtype, init=_INIT):
    return module.param(name, nn.with_logical_partitioning(init, axes), shape, dtype)


def _weight(module: nn.Module, name: str, shape, axes, dtype, out_major: bool):
    """A projection weight declared [in..., out...]; stored [out..., in...] when `out_major`."""
    if out_major:
        perm = OUT_MAJOR[name]
        shape, axes = tuple(shape[i] for i in perm), tuple(axes[i] for i in perm)
    return _param(module, name, shape, axes, dtype)


def linear(x, w, inputs: int, out_major: bool, feature_major: bool):
    """Projects the `inputs` feature axes of x through w (declared [in..., out...]).

    Token-major x [B, T, in...] -> [B, T, out...]; feature-major x [in, N] -> [out, N] (features merged
    into one axis, the B*T tokens into another; only the unrolled layout runs feature-major, so w is
    then out-major). `out_major` says w is stored [out..., in...].
    """
    in_shape = w.shape[len(w.shape) - inputs:] if out_major else w.shape[:inputs]
    out_shape = w.shape[:len(w.shape) - inputs] if out_major else w.shape[inputs:]
    n_in, n_out = math.prod(in_shape), math.prod(out_shape)
    w2 = w.reshape((n_out, n_in) if out_major else (n_in, n_out))
    if feature_major:
        assert out_major, "feature-major activations need output-major weights"
        return w2 @ x
    b, t = x.shape[:2]
    x2 = x.reshape(b, t, n_in)
    y = jnp.einsum("bti,oi->bto", x2, w2) if out_major else x2 @ w2
    return y.reshape((b, t) + out_shape)


def to_feature_major(x):
    """[B, T, F...] -> [prod(F), B*T]."""
    b, t = x.shape[:2]
    x = x.reshape(b, t, -1)
    return x.transpose(2, 0, 1).reshape(x.shape[-1], b * t)


def to_token_major(x, b: int, features=()):
    """[prod(features), B*T] -> [B, T, *features] (features default: one axis)."""
    f, n = x.shape
    features = tuple(features) or (f,)
    x = x.reshape(features + (b, n // b))
    k = len(features)
    return x.transpose((k, k + 1) + tuple(range(k)))


class RMSNorm(nn.Module):
    eps: float
    dtype: Any
    axis: int = -1  # the feature axis (0 for feature-major activations [E, N])

    @nn.compact
    def __call__(self, x):
        size = x.shape[self.axis]
        scale = _param(self, "scale", (size,), ("norm",), self.dtype, nn.initializers.ones)
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=self.axis, keepdims=True) + self.eps)
        return scale.reshape((size,) + (1,) * (x.ndim - 1 - self.axis % x.ndim)) * normed.astype(self.dtype)


class Attention(nn.Module):
    config: ModelConfig
    layout: ModelLayout
    dtype: Any
    out_major: bool = False

    @nn.compact
    def __call__(self, x, positions, ctx, cache, layer, feature_major: bool = False):
        c, lay = self.config, self.layout
        e, d = c.hidden_size, c.head_dim
        om = self.out_major
        wq = _weight(self, "q", (e, lay.q_heads, d), ("embed", "q_heads", "head_dim"), self.dtype, om)
        wk = _weight(self, "k", (e, lay.kv_heads, d), ("embed", "kv_heads", "head_dim"), self.dtype, om)
        wv = _weight(self, "v", (e, lay.kv_heads, d), ("embed", "kv_heads", "head_dim"), self.dtype, om)
        wo = _weight(self, "o", (lay.q_heads, d, e), ("q_heads", "head_dim", "embed"), self.dtype, om)

        rows = positions.shape[0]

        def heads(w, n):  # -> token-major [B, T, n, D], what RoPE and attention take
            y = linear(x, w, 1, om, feature_major)
            return to_token_major(y, rows, (n, d)) if feature_major else y

        q, k, v = heads(wq, lay.q_heads), heads(wk, lay.kv_heads), heads(wv, lay.kv_heads)
        inv_freq = inverse_frequencies(c)
        q = apply_rope(q, positions, inv_freq)
        k = apply_rope(k, positions, inv_freq)
        out, cache = ctx.attend(layer, q, k, v, cache, 1.0 / math.sqrt(d))
        if feature_major:
            out = to_feature_major(out)  # [Hq*D, N]
        return linear(out, wo, 2, om, feature_major), cache


class MLP(nn.Module):
    config: ModelConfig
    layout: ModelLayout
    dtype: Any
    out_major: bool = False

    @nn.compact
    def __call__(self, x, feature_major: bool = False):
        e, f, om = self.config.hidden_size, self.layout.mlp, self.out_major
        gate = _weight(self, "gate", (e, f), ("embed", "mlp"), self.dtype, om)
        up = _weight(self, "up", (e, f), ("embed", "mlp"), self.dtype, om)
        down = _weight(self, "down", (f, e), ("mlp", "embed"), self.dtype, om)
        h = jax.nn.silu(linear(x, gate, 1, om, feature_major)) * linear(x, up, 1, om, feature_major)
        return linear(h, down, 1, om, feature_major)


class DecoderLayer(nn.Module):
    config: ModelConfig
    layout: ModelLayout
    dtype: Any
    out_major: bool = False

    @nn.compact
    def __call__(self, carry, layer, positions, ctx, feature_major: bool = False):
        """`layer` indexes a stacked cache (scanned); None means `cache` is this layer's own (unrolled).
        `feature_major`: x is [E, B*T] (see the module docstring)."""
        x, cache = carry
        eps, axis = self.config.rms_norm_eps, 0 if feature_major else -1
        h = RMSNorm(eps, self.dtype, axis, name="attn_norm")(x)
        h, cache = Attention(self.config, self.layout, self.dtype, self.out_major, name="attn")(
            h, positions, ctx, cache, layer, feature_major)
        x = x + h
        h = RMSNorm(eps, self.dtype, axis, name="mlp_norm")(x)
        x = x + MLP(self.config, self.layout, self.dtype, self.out_major, name="mlp")(h, feature_major)
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
        else:  # the CPU layout: output-major weights, feature-major activations for short steps
            feature_major = tokens.shape[1] <= FEATURE_MAJOR_TOKENS
            rows = x.shape[0]
            if feature_major:
                x = to_feature_major(x)  # [E, B*T]
            caches = []
            for i in range(c.num_layers):
                (x, layer_cache), _ = DecoderLayer(c, lay, self.dtype, out_major=True, name=f"layers_{i}")(
                    (x, None if cache is None else cache[i]), None, positions, ctx, feature_major)
                caches.append(layer_cache)
            cache = None if cache is None else tuple(caches)
            if feature_major:
                x = to_token_major(x, rows)
        x = RMSNorm(c.rms_norm_eps, self.dtype, name="final_norm")(x)
        if logit_indices is not None:
            x = jnp.take_along_axis(x, logit_indices[..., None], axis=1)  # [B, N, E]
        if c.tie_embeddings:
            head = table.T
        else:
            head = _param(self, "lm_head", (c.hidden_size, lay.vocab), ("embed", "vocab"), self.dtype)
        logits = jnp.einsum("bte,ev->btv", x, head, preferred_element_type=jnp.float32)
        return logits[..., :c.vocab_size], cache
