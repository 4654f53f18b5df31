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

INIT = nn.initializers.normal(stddev=0.02)


def declare(module: nn.Module, name: str, shape, axes, dtype, init=INIT):
    """A parameter with its logical axes, the one declaration shardings and loading derive from."""
    return module.param(name, nn.with_logical_partitioning(init, axes), shape, dtype)


@dataclasses.dataclass(frozen=True)
class TokenMajor:
    """Weights declared [in..., out...]; activations [B, T, features...]."""

    norm_axis: int = -1  # the feature axis of activations

    def for_tokens(self, tokens_per_row: int) -> TokenMajor:
        """The layout a step of this many tokens per row runs in."""
        return self

    def weight(self, module: nn.Module, name: str, shape, axes, dtype):
        return declare(module, name, shape, axes, dtype)

    def apply(self, x, w, inputs: int):
        """Projects the `inputs` trailing feature axes of x [B, T, in...] through w -> [B, T, out...]."""
        n_in = math.prod(w.shape[:inputs])
        b, t = x.shape[:2]
        return (x.reshape(b, t, n_in) @ w.reshape(n_in, -1)).reshape((b, t) + w.shape[inputs:])

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
