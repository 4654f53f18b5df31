"""Flax (Linen) Llama-class decoder: RMSNorm, RoPE, GQA/MQA attention, SwiGLU MLP, tied embeddings.

Two layer loops, the same computation:
  * `scan` (the checkpoint layout): layers run under `nn.scan`, so compile time does not grow with
    depth, and every layer parameter carries a leading `layers` axis;
  * `unrolled`: a Python loop over `layers_0 .. layers_{L-1}`, each with its own arrays (and the
    KV cache a tuple of per-layer arrays); each layer is one nested jit (`apply_layer`), traced
    once per step shape and called L times, which XLA inlines.
How projection weights are stored and activations laid out is the `projections` object's business
(`jaxinfer.model.projections`); the module reads top to bottom without knowing the platform.
Every parameter is declared once, here, with its logical axes; shardings come from
`jaxinfer.sharding.LOGICAL_RULES`. Shapes use the physical (padded) sizes of a `ModelLayout`.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxinfer.config import ModelConfig
from jaxinfer.model.attention import MASK_VALUE
from jaxinfer.model.layout import ModelLayout
from jaxinfer.model.projections import TokenMajor, declare, declare_weight
from jaxinfer.model.rope import apply_rope, inverse_frequencies
from jaxinfer.quant.arrays import QWeight
from jaxinfer.quant.spec import NONE


class RMSNorm(nn.Module):
    eps: float
    dtype: Any
    axis: int = -1  # the feature axis

    @nn.compact
    def __call__(self, x):
        size = x.shape[self.axis]
        scale = declare(self, "scale", (size,), ("norm",), self.dtype, nn.initializers.ones)
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=self.axis, keepdims=True) + self.eps)
        return scale.reshape((size,) + (1,) * (x.ndim - 1 - self.axis % x.ndim)) * normed.astype(self.dtype)


class Attention(nn.Module):
    config: ModelConfig
    layout: ModelLayout
    dtype: Any
    proj: Any  # a Projections object (see jaxinfer.model.projections)

    @nn.compact
    def __call__(self, x, positions, ctx, cache, layer):
        c, lay, proj = self.config, self.layout, self.proj
        e, d = c.hidden_size, c.head_dim
        wq = proj.weight(self, "q", (e, lay.q_heads, d), ("embed", "q_heads", "head_dim"), self.dtype)
        wk = proj.weight(self, "k", (e, lay.kv_heads, d), ("embed", "kv_heads", "head_dim"), self.dtype)
        wv = proj.weight(self, "v", (e, lay.kv_heads, d), ("embed", "kv_heads", "head_dim"), self.dtype)
        wo = proj.weight(self, "o", (lay.q_heads, d, e), ("q_heads", "head_dim", "embed"), self.dtype)
        rows = positions.shape[0]
        q, k, v = proj.apply_many(x, (wq, wk, wv), 1)
        q = proj.to_heads(q, rows, lay.q_heads, d)  # [B, T, Hq, D]
        k = proj.to_heads(k, rows, lay.kv_heads, d)
        v = proj.to_heads(v, rows, lay.kv_heads, d)
        inv_freq = inverse_frequencies(c)
        q = apply_rope(q, positions, inv_freq)
        k = apply_rope(k, positions, inv_freq)
        out, cache = ctx.attend(layer, q, k, v, cache, 1.0 / math.sqrt(d))
        return proj.apply(proj.from_heads(out), wo, 2), cache


class MLP(nn.Module):
    config: ModelConfig
    layout: ModelLayout
    dtype: Any
    proj: Any

    @nn.compact
    def __call__(self, x):
        e, f, proj = self.config.hidden_size, self.layout.mlp, self.proj
        gate = proj.weight(self, "gate", (e, f), ("embed", "mlp"), self.dtype)
        up = proj.weight(self, "up", (e, f), ("embed", "mlp"), self.dtype)
        down = proj.weight(self, "down", (f, e), ("mlp", "embed"), self.dtype)
        g, u = proj.apply_many(x, (gate, up), 1)
        return proj.apply(jax.nn.silu(g) * u, down, 1)


class DecoderLayer(nn.Module):
    config: ModelConfig
    layout: ModelLayout
    dtype: Any
    proj: Any

    @nn.compact
    def __call__(self, carry, layer, positions, ctx):
        """`layer` indexes a stacked cache (scan); None means `cache` is this layer's own (unrolled)."""
        x, cache = carry
        eps, axis = self.config.rms_norm_eps, self.proj.norm_axis
        h = RMSNorm(eps, self.dtype, axis, name="attn_norm")(x)
        h, cache = Attention(self.config, self.layout, self.dtype, self.proj, name="attn")(
            h, positions, ctx, cache, layer
        )
        x = x + h
        h = RMSNorm(eps, self.dtype, axis, name="mlp_norm")(x)
        x = x + MLP(self.config, self.layout, self.dtype, self.proj, name="mlp")(h)
        return (x, cache), None


class Llama(nn.Module):
    """tokens [B, T] int32, positions [B, T] int32 -> logits [B, T or N, vocab] float32 (+ updated cache).

    `ctx` decides how attention sees keys and values (see `jaxinfer.model.attention`). With
    `logit_indices` [B, N], only those token positions of each row are projected to the vocabulary
    (the engine samples one token per sequence; prefill needs no other logits). `on_hidden`, given,
    is called with the final-normed hidden states of every position [B, T, E] and the vocabulary head
    [E, V] (V may be padded), and its result is returned third (the engine's prompt logprobs).
    A draft with a reduced head (`config.head_vocab`) returns the same shapes, its logits MASKED_LOGIT
    outside its head's token ids, and hands `on_hidden` its reduced head [E, head_vocab], whose columns
    are `head_ids`, not token ids (`_reduced_head`). `on_logits`, given, is called with the selected
    rows [B, N, E] and the function that projects rows to the vocabulary, and its result is returned
    in place of the logits (the engine step projects only as many rows as sample, `engine.sample_rows`).
    """

    config: ModelConfig
    layout: ModelLayout
    dtype: Any = jnp.float32
    layer_loop: str = "scan"  # scan | unrolled
    projections: Any = TokenMajor()

    @nn.compact
    def __call__(self, tokens, positions, ctx, cache=None, logit_indices=None, on_hidden=None, on_logits=None):
        c, lay = self.config, self.layout
        quant = self.projections.quant
        table, x = embed_tokens(self, tokens, self.dtype, quant)  # x [B, T, E]
        proj = self.projections.for_tokens(tokens.shape[1])
        rows = x.shape[0]
        x = proj.enter(x)
        if self.layer_loop == "scan":
            layers = nn.scan(
                DecoderLayer,
                variable_axes={"params": 0},
                split_rngs={"params": True},
                in_axes=(0, nn.broadcast, nn.broadcast),
                length=c.num_layers,
                metadata_params={nn.PARTITION_NAME: "layers"},
            )
            (x, cache), _ = layers(c, lay, self.dtype, proj, name="layers")(
                (x, cache), jnp.arange(c.num_layers, dtype=jnp.int32), positions, ctx
            )
        else:
            caches = []
            layer = DecoderLayer(c, lay, self.dtype, proj, parent=None)  # unbound: every layer's params fit it
            for i in range(c.num_layers):
                carry = (x, None if cache is None else cache[i])
                if self.is_initializing():  # declares layers_{i}'s params
                    (x, layer_cache), _ = layer.clone(parent=self, name=f"layers_{i}")(carry, None, positions, ctx)
                else:
                    x, layer_cache = apply_layer(layer, self.variables["params"][f"layers_{i}"], carry, positions, ctx)
                caches.append(layer_cache)
            cache = None if cache is None else tuple(caches)
        x = proj.leave(x, rows)
        hidden = RMSNorm(c.rms_norm_eps, self.dtype, name="final_norm")(x)
        x = hidden
        if logit_indices is not None:
            x = jnp.take_along_axis(x, logit_indices[..., None], axis=1)  # [B, N, E]
        project, head = self._reduced_head() if c.head_vocab else self._head(table)
        logits = on_logits(x, project) if on_logits is not None else project(x)
        if on_hidden is None:
            return logits, cache
        return logits, cache, on_hidden(hidden, head)

    def _head(self, table):
        """(rows [B, N, E] -> float32 logits [B, N, vocab], the head [E, V] for `on_hidden`)."""
        c, lay = self.config, self.layout
        if c.tie_embeddings:
            head, output_major = table, True
        else:
            quant = self.projections.quant
            head = declare_weight(self, "lm_head", (c.hidden_size, lay.vocab), ("embed", "vocab"), self.dtype, quant)
            output_major = False
        project = lambda x: self.projections.vocab_logits(x, head, output_major)[..., : c.vocab_size]
        return project, head.T if output_major else head

    def _reduced_head(self):
        """The head of a reduced-vocabulary draft: rows [B, N, E] -> logits over the full vocabulary
        [B, N, V], MASKED_LOGIT outside the `head_ids` columns (see `expand_head_logits`).

        Both head leaves are replicated (logical axis `draft_vocab`): a draft's head is small, and the
        logits come out whole on every device.

        `on_hidden` gets the reduced head [E, head_vocab]: its columns are head positions, not token
        ids, so the engine's prompt logprobs would be wrong, and requests for them are refused at the
        door (`RequestBuilder`). An exact full-vocabulary equivalent (hidden with a constant 1 feature,
        a [E + 1, V] head scattered from the columns with the mask as a bias row) was tried first: the
        engine step calls `on_hidden` every step, and XLA:CPU's scatter that builds the matrix took
        165 ms of SmolLM2's 2-layer draft's 177 ms per token.
        """
        c = self.config
        head = declare(self, "lm_head", (c.hidden_size, c.head_vocab), ("embed", "draft_vocab"), self.dtype)
        ids = declare(self, "head_ids", (c.head_vocab,), ("draft_vocab",), jnp.int32, _first_ids)
        project = lambda x: expand_head_logits(
            jnp.einsum("bte,eh->bth", x, head, preferred_element_type=jnp.float32), ids, c.vocab_size
        )
        return project, head


@functools.partial(jax.jit, static_argnums=0)
def apply_layer(layer: DecoderLayer, params, carry, positions, ctx):
    """One unrolled layer, as a nested jit: JAX traces and lowers it once per step shape and calls it
    from every layer (XLA inlines the calls, so the compiled step is the same), where a Python loop over
    the modules would trace all `num_layers` copies."""
    return layer.apply({"params": params}, carry, None, positions, ctx)[0]


def embed_tokens(module: nn.Module, tokens, dtype, quant):
    """Declares `module`'s embedding table (param `embed`, plus its scales when quantized) and looks up
    `tokens` -> (the table, rows [..., E] in `dtype`)."""
    c, lay = module.config, module.layout
    table = declare_weight(module, "embed", (lay.vocab, c.hidden_size), ("vocab", "embed"), dtype, quant)
    if isinstance(table, QWeight):
        return table, table.rows(tokens, dtype)
    return table, jnp.take(table, tokens, axis=0)


class TokenTable(nn.Module):
    """The model's embedding lookup alone, applied to the model's own params (its `embed*` leaves): what a
    feature head reads for the tokens it proposes (`jaxinfer.engine.head_step`)."""

    config: ModelConfig
    layout: ModelLayout
    dtype: Any = jnp.float32
    quant: Any = NONE  # the model's QuantSpec

    @nn.compact
    def __call__(self, tokens):
        return embed_tokens(self, tokens, self.dtype, self.quant)[1]


MASKED_LOGIT = MASK_VALUE  # the logit of a token outside a draft's reduced head: finite, exp() underflows to 0


def expand_head_logits(small, head_ids, vocab_size: int):
    """Reduced-head logits [..., H] with head_ids i32 [H] (distinct target ids) -> [..., vocab_size], each
    column at its id and MASKED_LOGIT elsewhere. A scatter: on CPU 0.15 ms for one row of SmolLM2's
    49,152 ids from 8,192 (a gather through the inverse map is 1.6-16x slower)."""
    base = jnp.full(small.shape[:-1] + (vocab_size,), MASKED_LOGIT, small.dtype)
    return base.at[..., head_ids].set(small, unique_indices=True)


def _first_ids(key, shape, dtype):
    """Random init of `head_ids`: the first head_vocab ids (a preset draft with random weights)."""
    del key
    return jnp.arange(shape[0], dtype=dtype)
