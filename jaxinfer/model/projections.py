"""How the model stores its projection weights and lays out activations: the default `TokenMajor`.

The Llama module never asks which platform it runs on; it asks its `Projections` object to declare
each weight, to apply it, and to move activations between the layout the projections like and the
token-major one attention and RoPE take. `TokenMajor` is the checkpoint layout (weights
[in..., out...], activations [B, T, features...]); `jaxinfer.model.cpu_layout.OutputMajor` is the
layout XLA:CPU runs fastest.
"""

from __future__ import annotations

import dataclasses
import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxinfer.quant.arrays import QWeight, materialize
from jaxinfer.quant.spec import GROUP_AXES, INPUT_AXES, NONE, QuantSpec

INIT = nn.initializers.normal(stddev=0.02)


def declare(module: nn.Module, name: str, shape, axes, dtype, init=INIT):
    """A parameter with its logical axes, the one declaration shardings and loading derive from."""
    return module.param(name, nn.with_logical_partitioning(init, axes), shape, dtype)


def declare_weight(module: nn.Module, name: str, shape, axes, dtype, quant: QuantSpec, perm=None):
    """Weight `name`, declared [in..., out...] (the embedding table: [vocab, embed]): a float parameter,
    or, when `quant` quantizes this kind, a `QWeight` of three parameters `name`, `name_scale` and
    (asymmetric formats) `name_offset`, grouped along the last contraction axis (`quant.spec`).
    `perm`, given, stores all of them permuted (the CPU layout's output-major order)."""
    perm = tuple(range(len(shape))) if perm is None else tuple(perm)
    stored = lambda seq: tuple(seq[i] for i in perm)  # noqa: E731
    wq = quant.get(name)
    if wq is None:
        return declare(module, name, stored(shape), stored(axes), dtype)
    inputs = INPUT_AXES.get(name, 1)
    grouped = inputs - 1 if inputs > 0 else len(shape) + inputs  # the last contraction axis
    scale_shape = list(shape)
    scale_shape[grouped] = wq.groups(shape[grouped])
    scale_axes = list(axes)
    scale_axes[grouped] = GROUP_AXES[axes[grouped]]
    codes = declare(module, name, stored(shape), stored(axes), wq.dtype, _random_codes)
    scale = declare(module, f"{name}_scale", stored(scale_shape), stored(scale_axes), jnp.float32, _random_scale)
    offset = None
    if wq.offset:
        offset = declare(module, f"{name}_offset", stored(scale_shape), stored(scale_axes), jnp.float32, _centre)
    return QWeight(codes, scale, offset, wq, perm.index(grouped))


def _random_codes(key, shape, dtype):
    """Random init of quantized codes (presets with random weights: benchmarks, AOT)."""
    info = jnp.iinfo(dtype)
    return jax.random.randint(key, shape, int(info.min), int(info.max) + 1, jnp.int32).astype(dtype)


def _random_scale(key, shape, dtype):
    del key
    return jnp.full(shape, 0.005, dtype)


def _centre(key, shape, dtype):
    """The offset that centres random uint4 codes (0..15) on zero."""
    del key
    return jnp.full(shape, -7.5 * 0.005, dtype)


@dataclasses.dataclass(frozen=True)
class TokenMajor:
    """Weights declared [in..., out...]; activations [B, T, features...]."""

    norm_axis: int = -1  # the feature axis of activations
    quant: QuantSpec = NONE

    def for_tokens(self, tokens_per_row: int) -> TokenMajor:
        """The layout a step of this many tokens per row runs in."""
        return self

    def weight(self, module: nn.Module, name: str, shape, axes, dtype):
        return declare_weight(module, name, shape, axes, dtype, self.quant)

    def apply(self, x, w, inputs: int):
        """Projects the `inputs` trailing feature axes of x [B, T, in...] through w -> [B, T, out...]."""
        n_in = math.prod(w.shape[:inputs])
        b, t = x.shape[:2]
        w2 = materialize(w, x.dtype).reshape(n_in, -1)
        return (x.reshape(b, t, n_in) @ w2).reshape((b, t) + w.shape[inputs:])

    def apply_many(self, x, ws, inputs: int):
        """`apply` of several weights to the same x (a layout may fuse them into one call)."""
        return tuple(self.apply(x, w, inputs) for w in ws)

    def vocab_logits(self, x, head, output_major: bool):
        """x [B, N, E] against the vocabulary head -> float32 logits [B, N, V]: `head` is the embedding
        table [V, E] (tied, `output_major`) or an lm_head [E, V]."""
        dense = materialize(head, x.dtype)
        return jnp.einsum(
            "bne,ve->bnv" if output_major else "bne,ev->bnv", x, dense, preferred_element_type=jnp.float32
        )

    def enter(self, x):
        """[B, T, E] -> this layout's activations."""
        return x

    def leave(self, x, rows: int):
        """This layout's activations -> [B, T, E]."""
        return x

    def to_heads(self, y, rows: int, heads: int, head_dim: int):
        """A q/k/v projection's output -> token-major heads [B, T, heads, head_dim]."""
        return y

    def from_heads(self, out):
        """Attention output [B, T, heads, head_dim] -> this layout's input to the output projection."""
        return out
