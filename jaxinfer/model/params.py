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
from jaxinfer.model.feature_head import FeatureHead
from jaxinfer.model.layout import ModelLayout, plan_layout
from jaxinfer.model.llama import Llama
from jaxinfer.model.projections import TokenMajor
from jaxinfer.quant.quantize import quantize
from jaxinfer.quant.spec import NONE, QuantSpec
from jaxinfer.sharding import logical_sharding

Params = dict[str, Any]


def _boxed_init(config: ModelConfig, layout: ModelLayout, dtype, quant: QuantSpec, seed: int):
    """The module's boxed (logically partitioned) initial params: a Llama, or a feature head (a draft on
    the target's hidden states, `jaxinfer.model.feature_head`, whose inputs are features)."""
    if config.feature_head:
        rows = jnp.zeros((1, 1, config.hidden_size), dtype)
        return FeatureHead(config, dtype).init(jax.random.key(seed), rows, rows)["params"]
    module = Llama(config, layout, dtype, projections=TokenMajor(quant=quant))
    tokens = jnp.zeros((1, 1), jnp.int32)
    return module.init(jax.random.key(seed), tokens, tokens, DenseCausal(tokens))["params"]


@functools.lru_cache(maxsize=32)
def _abstract_boxed(config: ModelConfig, layout: ModelLayout, dtype, quant: QuantSpec = NONE) -> Params:
    return jax.eval_shape(lambda: _boxed_init(config, layout, dtype, quant, 0))


def logical_axes(config: ModelConfig, layout: ModelLayout, dtype=jnp.float32, quant: QuantSpec = NONE) -> Params:
    """Tree of logical-axis tuples, e.g. ('layers', 'embed', 'q_heads', 'head_dim')."""
    boxed = _abstract_boxed(config, layout, dtype, quant)
    return jax.tree.map(lambda b: tuple(b.names), boxed, is_leaf=lambda x: isinstance(x, nn.Partitioned))


def abstract_params(
    config: ModelConfig, layout: ModelLayout, dtype=jnp.float32, mesh=None, quant: QuantSpec = NONE
) -> Params:
    """Tree of `jax.ShapeDtypeStruct` (with shardings when `mesh` is given). Allocates nothing."""
    boxed = _abstract_boxed(config, layout, dtype, quant)

    def leaf(b):
        v = b.value
        sharding = logical_sharding(mesh, b.names, v.shape) if mesh is not None else None
        return jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=sharding)

    return jax.tree.map(leaf, boxed, is_leaf=lambda x: isinstance(x, nn.Partitioned))


def param_shardings(mesh, config: ModelConfig, layout: ModelLayout, dtype=jnp.float32, quant: QuantSpec = NONE):
    return jax.tree.map(lambda a: a.sharding, abstract_params(config, layout, dtype, mesh, quant))


def count_params(config: ModelConfig, dtype=jnp.float32) -> int:
    tree = abstract_params(config, plan_layout(config, 1, quiet=True), dtype)
    return sum(int(np.prod(a.shape)) for a in jax.tree.leaves(tree))


def init_params(
    config: ModelConfig, layout: ModelLayout, mesh, dtype=jnp.float32, seed: int = 0, quant: QuantSpec = NONE
) -> Params:
    """Random parameters created directly sharded on `mesh` (tests, benchmarks with random weights)."""
    shardings = param_shardings(mesh, config, layout, dtype, quant)

    @functools.partial(jax.jit, out_shardings=shardings)
    def init():
        return nn.unbox(_boxed_init(config, layout, dtype, quant, seed))

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


def pad_to_shape(array, shape):
    """Zero-pads the trailing end of every axis shorter than `shape` (the group axis of a quantized MLP's
    scales, whose padding `pad_to_layout` does not know)."""
    xp = jnp if isinstance(array, jax.Array) else np
    widths = [(0, t - n) for n, t in zip(array.shape, shape)]
    return xp.pad(array, widths) if any(w for _, w in widths) else array


def place(array: np.ndarray, sharding, dtype) -> jax.Array:
    """Host array -> global sharded jax.Array; each device receives only its own slice."""
    array = np.asarray(array, dtype=jnp.dtype(dtype))
    return jax.make_array_from_callback(array.shape, sharding, lambda index: array[index])


def build_params(
    config: ModelConfig,
    layout: ModelLayout,
    mesh,
    dtype,
    logical_leaf: Callable[[tuple[str, ...]], np.ndarray],
    layer_leaf: Callable[[tuple[str, ...], int], np.ndarray] | None = None,
    quant: QuantSpec = NONE,
) -> Params:
    """Assembles sharded params one leaf at a time: `logical_leaf(path)` returns the unpadded host array;
    `layer_leaf(path, i)`, when given, one layer of a stacked (`layers`) leaf.

    Host memory holds one source tensor at a time: a stacked leaf is placed layer by layer (each layer's
    array split over the devices at once) and stacked on device, so the host never holds all layers of
    a weight kind (35 GiB for Llama-3-70B's MLP down projection); each device receives only its slices.
    Weights `quant` quantizes are padded, then quantized, one layer at a time (`_place_quantized`).
    """
    axes_tree = logical_axes(config, layout, dtype, quant)
    target = abstract_params(config, layout, dtype, mesh, quant)
    flat_axes = dict(_flatten(axes_tree))
    flat_target = dict(_flatten(target))
    out = {}
    for path, spec in flat_target.items():
        axes = flat_axes[path]
        if _quantized_part(path, quant):
            continue  # placed with its codes
        if quant.get(path[-1]) is not None:
            stacked = layer_leaf is not None and axes[0] == "layers"
            layer = (lambda i, p=path: layer_leaf(p, i)) if stacked else None
            whole = lambda p=path: logical_leaf(p)  # noqa: E731
            for part, value in _place_quantized(path, quant, flat_target, flat_axes, layout, whole, layer):
                set_path(out, part, value)
            continue
        if layer_leaf is not None and axes[:1] == ("layers",):
            value = place_stacked(spec, axes, layout, dtype, lambda i, p=path: layer_leaf(p, i))
        else:
            host = pad_to_layout(logical_leaf(path), axes, layout)
            if host.shape != spec.shape:
                raise ValueError(f"parameter {'/'.join(path)}: built shape {host.shape}, expected {spec.shape}")
            value = place(host, spec.sharding, spec.dtype)  # spec.dtype: int leaves (head_ids) stay int
            del host
        set_path(out, path, value)
    return out


def _quantized_part(path, quant: QuantSpec) -> bool:
    """Whether `path` is the scale or offset of a quantized weight (placed together with its codes)."""
    name = path[-1]
    return any(name.endswith(s) and quant.get(name.removesuffix(s)) is not None for s in ("_scale", "_offset"))


def quantized_paths(path, wq) -> list[tuple[str, ...]]:
    """The leaves of quantized weight `path`: its codes, scale and (asymmetric formats) offset."""
    name = path[-1]
    return [path, path[:-1] + (f"{name}_scale",)] + ([path[:-1] + (f"{name}_offset",)] if wq.offset else [])


def grouped_axis(scale_axes: tuple[str, ...]) -> int:
    """The index of a scale's group axis (see `jaxinfer.quant.spec.GROUP_AXES`)."""
    return next(i for i, a in enumerate(scale_axes) if a.endswith("_groups"))


def _place_quantized(path, quant: QuantSpec, flat_target, flat_axes, layout: ModelLayout, whole, layer):
    """[(leaf path, placed array)] of quantized weight `path` (codes, scale and, asymmetric formats,
    offset): `whole()` gives the unpadded weight, or, for a stacked one, `layer(i)` one layer at a time,
    either as a float array (padded to the layout, then quantized on the host) or as the (codes, scale,
    offset) a checkpoint stores (each padded to the layout: `--quantize gguf`)."""
    wq = quant.get(path[-1])
    paths = quantized_paths(path, wq)
    specs = [flat_target[p] for p in paths]
    skip = 0 if layer is None else 1  # a stacked leaf's layer axis

    def parts(source):
        if isinstance(source, tuple):
            arrays = [a for a in source if a is not None]
            return [
                pad_to_shape(pad_to_layout(a, flat_axes[p][skip:], layout), s.shape[skip:])
                for a, p, s in zip(arrays, paths, specs)
            ]
        padded = pad_to_layout(source, flat_axes[path][skip:], layout)
        return [a for a in quantize(padded, wq, grouped_axis(flat_axes[paths[1]]) - skip) if a is not None]

    if layer is None:
        return [(p, place(a, s.sharding, s.dtype)) for p, a, s in zip(paths, parts(whole()), specs)]
    per_layer = [[] for _ in paths]
    for i in range(specs[0].shape[0]):
        for placed, a, s in zip(per_layer, parts(layer(i)), specs):
            placed.append(place(a, _without_layer_axis(s.sharding, len(s.shape)), s.dtype))
    return [(p, _stack(s.sharding)(*placed)) for p, placed, s in zip(paths, per_layer, specs)]


def _without_layer_axis(sharding, ndim: int):
    """A stacked leaf's sharding for one of its layers (the leading `layers` axis dropped)."""
    partition = tuple(sharding.spec) + (None,) * (ndim - len(sharding.spec))
    return jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec(*partition[1:]))


def place_stacked(spec: jax.ShapeDtypeStruct, axes: tuple[str, ...], layout: ModelLayout, dtype, layer) -> jax.Array:
    """The stacked leaf `spec` ([layers, ...]) from `layer(i)` (unpadded host arrays), one layer on the host
    at a time: each is padded and placed with the leaf's sharding minus its layer axis, then all are
    stacked on device into the leaf's sharding."""
    sharding = spec.sharding
    one = _without_layer_axis(sharding, len(spec.shape))
    parts = []
    for i in range(spec.shape[0]):
        host = pad_to_layout(layer(i), axes[1:], layout)
        if host.shape != spec.shape[1:]:
            raise ValueError(f"layer {i}: built shape {host.shape}, expected {spec.shape[1:]}")
        parts.append(place(host, one, dtype))
        del host
    return _stack(sharding)(*parts)


@functools.lru_cache(maxsize=64)
def _stack(sharding):
    return jax.jit(lambda *parts: jnp.stack(parts), out_shardings=sharding)


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
