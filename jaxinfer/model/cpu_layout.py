"""The CPU layout: unrolled layers, output-major projection weights, feature-major short steps.

XLA:CPU copies a scanned layer's weights out of the stack before every matmul (its dots cannot read
a dynamic slice in place), so on CPU each layer gets its own arrays (`unroll`), and the KV cache is
a tuple of per-layer arrays for the same reason. Projection weights are stored output-major
([out..., in...]), and steps of at most `FEATURE_MAJOR_TOKENS` tokens per row run feature-major:
activations [features, B*T], every projection `W[out, in] @ x`. XLA:CPU's dots for a few dozen
tokens are 15-40% faster that way than `x @ W[in, out]`; longer steps stay token-major
(`x @ W[out, in].T`). The platform policy (`jaxinfer.platform`) decides when this layout is used.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp

from jaxinfer.model.params import flatten, set_path
from jaxinfer.model.projections import TokenMajor, declare_weight
from jaxinfer.native import matmul
from jaxinfer.quant.arrays import QWeight, materialize
from jaxinfer.quant.spec import NONE, QuantSpec

FEATURE_MAJOR_TOKENS = 64  # steps of at most this many tokens per row run feature-major
# projection weight -> the permutation from its declared [in..., out...] order to the stored
# [out..., in...] order
OUT_MAJOR = {
    "q": (1, 2, 0),
    "k": (1, 2, 0),
    "v": (1, 2, 0),
    "o": (2, 0, 1),
    "gate": (1, 0),
    "up": (1, 0),
    "down": (1, 0),
}


@dataclasses.dataclass(frozen=True)
class OutputMajor:
    """Weights stored [out..., in...]; activations token-major [B, T, F...] or feature-major [F, B*T]."""

    feature_major: bool = False
    quant: QuantSpec = NONE
    native: bool = False  # quantized and bfloat16 weights through the native linear layer (`jaxinfer.native.matmul`)

    @property
    def norm_axis(self) -> int:
        return 0 if self.feature_major else -1

    def for_tokens(self, tokens_per_row: int) -> OutputMajor:
        return dataclasses.replace(self, feature_major=tokens_per_row <= FEATURE_MAJOR_TOKENS)

    def weight(self, module, name: str, shape, axes, dtype):
        return declare_weight(module, name, shape, axes, dtype, self.quant, OUT_MAJOR[name])

    def apply(self, x, w, inputs: int):
        return self.apply_many(x, (w,), inputs)[0]

    def apply_many(self, x, ws, inputs: int):
        """`apply` of several weights to the same x; natively one kernel call for all of them (q, k and
        v; gate and up), which spreads small weights over every core. A weight the kernel does not take
        (float32) goes through XLA's dot, the others through the kernel."""
        outs = [w.shape[: w.ndim - inputs] for w in ws]
        flats = [native_operands(w, math.prod(o), inputs) if self.native else None for w, o in zip(ws, outs)]
        if any(f is None for f in flats):
            return tuple(
                self._dot(x, w, o) if f is None else self._native(x, [f], [o])[0] for w, f, o in zip(ws, flats, outs)
            )
        return self._native(x, flats, outs)

    def _native(self, x, flats, outs):
        """x through `matmul.linears` of the (values, scale, offset, group) `flats`, shaped [B, T, out...]
        each (feature-major: [prod(out), N])."""
        if self.feature_major:  # x [in, N] -> [out, N]
            return tuple(y.T for y in matmul.linears(x.T, flats))
        b, t = x.shape[:2]
        return tuple(y.reshape((b, t) + o) for y, o in zip(matmul.linears(x.reshape(b, t, -1), flats), outs))

    def _dot(self, x, w, out):
        """x through XLA's own dot with w (output-major, `out` its output axes)."""
        w2 = materialize(w, x.dtype).reshape(math.prod(out), -1)
        if self.feature_major:
            return w2 @ x  # [out, N]
        b, t = x.shape[:2]
        return jnp.einsum("bti,oi->bto", x.reshape(b, t, -1), w2).reshape((b, t) + out)

    def vocab_logits(self, x, head, output_major: bool):
        """x [B, N, E] against the vocabulary head -> float32 logits [B, N, V]: `head` is the embedding
        table [V, E] (tied, `output_major`) or an lm_head [E, V]."""
        if self.native and (isinstance(head, QWeight) or head.dtype == jnp.bfloat16):
            table = head if output_major else head.T
            flat = native_operands(table, table.shape[0], 1)
            return matmul.linear(x.astype(jnp.float32), *flat[:3], group=flat[3])
        return TokenMajor().vocab_logits(x, head, output_major)

    def enter(self, x):
        return to_feature_major(x) if self.feature_major else x

    def leave(self, x, rows: int):
        return to_token_major(x, rows) if self.feature_major else x

    def to_heads(self, y, rows: int, heads: int, head_dim: int):
        return to_token_major(y, rows, (heads, head_dim)) if self.feature_major else y

    def from_heads(self, out):
        return to_feature_major(out) if self.feature_major else out


def native_operands(w, n_out: int, inputs: int):
    """(values [O, I], scale, offset, group) of an output-major weight for `matmul.linear`, or None where
    XLA's own dot serves as well (float32) or the groups do not flatten into one run along the whole
    input (several input axes, the last not a whole number of groups: none of the formats made here)."""
    if not isinstance(w, QWeight):
        return (w.reshape(n_out, -1), None, None, None) if w.dtype == jnp.bfloat16 else None
    length = w.codes.shape[-1]
    group = min(w.quant.group, length)
    if inputs > 1 and length % group:
        return None
    offset = None if w.offset is None else w.offset.reshape(n_out, -1)
    return w.codes.reshape(n_out, -1), w.scale.reshape(n_out, -1), offset, group


def weight_kind(leaf_name: str) -> str:
    """The weight kind a parameter leaf belongs to: `q_scale` and `q_offset` are parts of `q`."""
    return leaf_name.removesuffix("_scale").removesuffix("_offset")


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


@functools.cache
def _layer_splitter(num_layers: int, sharding, perm: tuple[int, ...]):
    """One jitted split per (depth, sharding, permutation), so weight kinds of equal shape share one compilation."""
    return jax.jit(
        lambda a: tuple(a[i].transpose(perm) for i in range(num_layers)), out_shardings=(sharding,) * num_layers
    )


def unroll(params: dict, num_layers: int) -> dict:
    """Scanned params {'layers': leaves [L, ...]} -> unrolled {'layers_0': ..., 'layers_{L-1}': ...}.

    Projection weights are transposed to output-major order (`OUT_MAJOR`). Each per-layer array keeps
    its stacked sharding minus the layer axis (permuted alike). Runs one weight kind at a time and
    drops the stacked array as soon as it is split, so device memory peaks at the weights plus one
    weight kind: `params` is consumed. Abstract params (`ShapeDtypeStruct`s, AOT) convert alike.
    """
    out = {k: v for k, v in params.items() if k != "layers"}
    stacked = params["layers"]
    for path, leaf in flatten(stacked):
        spec = tuple(leaf.sharding.spec) + (None,) * (len(leaf.shape) - len(leaf.sharding.spec))
        perm = OUT_MAJOR.get(weight_kind(path[-1]), tuple(range(len(leaf.shape) - 1)))
        one = jax.sharding.NamedSharding(leaf.sharding.mesh, jax.sharding.PartitionSpec(*(spec[1:][i] for i in perm)))
        if isinstance(leaf, jax.ShapeDtypeStruct):
            shape = tuple(leaf.shape[1:][i] for i in perm)
            parts = [jax.ShapeDtypeStruct(shape, leaf.dtype, sharding=one)] * num_layers
        else:
            parts = _layer_splitter(num_layers, one, perm)(leaf)
        for i, part in enumerate(parts):
            set_path(out, (f"layers_{i}",) + path, part)
        set_path(stacked, path, None)
        del leaf
    return out
