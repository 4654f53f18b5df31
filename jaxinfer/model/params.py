"""Parameter trees derived from the one declaration in `llama.py`: abstract shapes, logical axes,
shardings, random initialisation and load-time padding to a `ModelLayout`."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxinfer.config import ModelConfig
from jaxinfer.model.attention import DenseCausal
from jaxinfer.model.layout import ModelLayout, plan_layout
from jaxinfer.model.llama import Llama
from jaxinfer.sharding import logical_sharding

Params = dict[str, Any]


@functools.lru_cache(maxsize=32)
def _abstract_boxed(config: ModelConfig, layout: ModelLayout, dtype) -> Params:
    module = Llama(config, layout, dtype)
    tokens = jnp.zeros((1, 1), jnp.int32)
    return jax.eval_shape(lambda: module.init(jax.random.key(0), tokens, tokens, DenseCausal(tokens)))["params"]


def logical_axes(config: ModelConfig, layout: ModelLayout, dtype=jnp.float32) -> Params:
    """Tree of logical-axis tuples, e.g. ('layers', 'embed', 'q_heads', 'head_dim')."""
    boxed = _abstract_boxed(config, layout, dtype)
    return jax.tree.map(lambda b: tuple(b.names), boxed, is_leaf=lambda x: isinstance(x, nn.Partitioned))


def abstract_params(config: ModelConfig, layout: ModelLayout, dtype=jnp.float32, mesh=None) -> Params:
    """Tree of `jax.ShapeDtypeStruct` (with shardings when `mesh` is given). Allocates nothing."""
    boxed = _abstract_boxed(config, layout, dtype)

    def leaf(b):
        v = b.value
        sharding = logical_sharding(mesh, b.names, v.shape) if mesh is not None else None
        return jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=sharding)

    return jax.tree.map(leaf, boxed, is_leaf=lambda x: isinstance(x, nn.Partitioned))


def param_shardings(mesh, config: ModelConfig, layout: ModelLayout, dtype=jnp.float32) -> Params:
    return jax.tree.map(lambda a: a.sharding, abstract_params(config, layout, dtype, mesh))


def count_params(config: ModelConfig, dtype=jnp.float32) -> int:
    tree = abstract_params(config, plan_layout(config, 1, quiet=True), dtype)
    return sum(int(np.prod(a.shape)) for a in jax.tree.leaves(tree))


def init_params(config: ModelConfig, layout: ModelLayout, mesh, dtype=jnp.float32, seed: int = 0) -> Params:
    """Random parameters created directly sharded on `mesh` (tests, benchmarks with random weights)."""
    module = Llama(config, layout, dtype)
    shardings = param_shardings(mesh, config, layout, dtype)

    @functools.partial(jax.jit, out_shardings=shardings)
    def init():
        tokens = jnp.zeros((1, 1), jnp.int32)
        return nn.unbox(module.init(jax.random.key(seed), tokens, tokens, DenseCausal(tokens))["params"])

    return init()


def pad_to_layout(array: np.ndarray, axes: tuple[str, ...], layout: ModelLayout) -> np.ndarray:
    """Pads a logical (unpadded) parameter to `layout`, axis by axis, as its logical axes dictate.

    Works on numpy arrays (host, at import) and jax arrays (device, inside jit at Orbax restore).
    """
    xp = jnp if isinstance(array, jax.Array) else np
    for dim, name in enumerate(axes):
        if name in ("q_heads", "kv_heads"):
            source = layout.q_source if name == "q_heads" else layout.kv_source
            if list(source) == list(range(array.shape[dim])):
                continue
            zero = xp.zeros_like(xp.take(array, xp.asarray([0]), axis=dim))
            parts = [xp.take(array, xp.asarray([s]), axis=dim) if s is not None else zero for s in source]
            array = xp.concatenate(parts, axis=dim)
        elif name in ("mlp", "vocab"):
            target = layout.mlp if name == "mlp" else layout.vocab
            if array.shape[dim] < target:
                widths = [(0, 0)] * array.ndim
                widths[dim] = (0, target - array.shape[dim])
                array = xp.pad(array, widths)
    return array


def place(array: np.ndarray, sharding, dtype) -> jax.Array:
    """Host array -> global sharded jax.Array; each device receives only its own slice."""
    array = np.asarray(array, dtype=jnp.dtype(dtype))
    return jax.make_array_from_callback(array.shape, sharding, lambda index: array[index])


def build_params(
    config: ModelConfig, layout: ModelLayout, mesh, dtype, logical_leaf: Callable[[tuple[str, ...]], np.ndarray]
) -> Params:
    """Assembles sharded params one leaf at a time: `logical_leaf(path)` returns the unpadded host array.

    Only one leaf (all layers of one weight kind) is on the host at a time, so peak host memory stays
    near the size of the largest weight kind, not the whole model.
    """
    axes_tree = logical_axes(config, layout, dtype)
    target = abstract_params(config, layout, dtype, mesh)
    flat_axes = dict(_flatten(axes_tree))
    out = {}
    for path, spec in _flatten(target):
        host = logical_leaf(path)
        host = pad_to_layout(host, flat_axes[path], layout)
        if host.shape != spec.shape:
            raise ValueError(f"parameter {'/'.join(path)}: built shape {host.shape}, expected {spec.shape}")
        set_path(out, path, place(host, spec.sharding, dtype))
        del host
    return out


def _flatten(tree, prefix=()):
    if isinstance(tree, dict):
        for k in sorted(tree):
            yield from _flatten(tree[k], prefix + (k,))
    else:
        yield prefix, tree


def set_path(tree, path, value):
    for k in path[:-1]:
        tree = tree.setdefault(k, {})
    tree[path[-1]] = value


def flatten(tree) -> list[tuple[tuple[str, ...], Any]]:
    return list(_flatten(tree))
