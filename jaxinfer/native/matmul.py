"""A linear layer with float32, bfloat16, int8, int4 or uint4 weights for XLA:CPU (matmul.cc).

`linear(x, values, scale, offset, group=...)` is `x @ dequantize(values).T`, accumulated in float32.
XLA:CPU computes that as a convert pass over the weight followed by a float32 dot, which made a
bfloat16 decode step 8x slower than float32 on a 2-core host; the native kernel turns each weight row
into floats in cache, once per call, and reads each weight byte once. On other platforms, and where
the kernel cannot be built (one log line says why), the same contract runs as XLA ops (`reference`).

4-bit weights are plain `jnp.int4` / `jnp.uint4` arrays: XLA:CPU already stores them packed two per
byte (low nibble first), and the kernel reads that buffer as it is.
"""

from __future__ import annotations

import functools
import logging
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import ManualAxisType

from jaxinfer import native

log = logging.getLogger(__name__)

TARGET = "jaxinfer_linears"
FLOAT_TYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16))
INT_TYPES = (jnp.dtype(jnp.int8), jnp.dtype(jnp.int4), jnp.dtype(jnp.uint4))


@functools.cache
def load() -> None:
    """Builds (once per host and version) and registers the kernel; raises native.NativeUnavailable."""
    lib = native.load_library("matmul.cc")
    jax.ffi.register_ffi_target(TARGET, jax.ffi.pycapsule(lib.JaxinferLinears), platform="cpu")


@functools.cache
def unavailable_reason() -> str | None:
    """None when the native linear layer is ready on this host, else why not (one line, logged once)."""
    try:
        load()
    except native.NativeUnavailable as e:
        log.warning("native linear layer unavailable, XLA's dequantize-then-dot runs instead: %s", e)
        return str(e)
    return None


def available() -> bool:
    return unavailable_reason() is None


def _check(x, values, scale, offset, group) -> int:
    """The group length after checking every argument (one ValueError line naming the field)."""
    xd, wd = jnp.dtype(x.dtype), jnp.dtype(values.dtype)
    if xd not in FLOAT_TYPES:
        raise ValueError(f"linear: x dtype {xd} is not float32 or bfloat16")
    if values.ndim != 2 or x.shape[-1] != values.shape[1]:
        raise ValueError(f"linear: values shape {values.shape} is not [O, I] with I = x.shape[-1] = {x.shape[-1]}")
    out, inputs = values.shape
    if wd in FLOAT_TYPES:
        if scale is not None or offset is not None:
            raise ValueError(f"linear: {wd} values take no scale or offset")
        return inputs
    if wd not in INT_TYPES:
        raise ValueError(f"linear: values dtype {wd} is not float32, bfloat16, int8, int4 or uint4")
    if scale is None or scale.ndim != 2 or scale.shape[0] != out:
        raise ValueError(f"linear: scale must be float32 [O={out}, groups] for {wd} values, got {scale}")
    if group is None:
        if scale.shape[1] != 1:
            raise ValueError(f"linear: group is required when scale has {scale.shape[1]} groups per row")
        group = max(inputs, 1)
    if group < 1 or scale.shape[1] != math.ceil(inputs / group):
        raise ValueError(
            f"linear: scale shape {scale.shape} does not fit group {group}: want [{out}, ceil({inputs}/{group})]"
        )
    if offset is not None and offset.shape != scale.shape:
        raise ValueError(f"linear: offset shape {offset.shape} is not scale's {scale.shape}")
    return group


def dequantize(values, scale=None, offset=None, *, group: int):
    """values * scale[group] (+ offset[group]) in float32: [O, I]."""
    w = values.astype(jnp.float32)
    if scale is not None:
        inputs = values.shape[1]
        s = jnp.repeat(scale.astype(jnp.float32), group, axis=1)[:, :inputs]
        w = w * s
        if offset is not None:
            w = w + jnp.repeat(offset.astype(jnp.float32), group, axis=1)[:, :inputs]
    return w


def reference(x, values, scale=None, offset=None, *, group: int):
    """The contract as XLA ops: dequantize to float32, one float32 dot, cast to x's dtype. [N, I] -> [N, O]."""
    w = dequantize(values, scale, offset, group=group)
    return jnp.dot(x.astype(jnp.float32), w.T, preferred_element_type=jnp.float32).astype(x.dtype)


def _triples(flat):
    """(values, scale, offset, values, ...) -> [(values, scale, offset), ...] (platform_dependent takes
    the weights flat)."""
    return list(zip(flat[0::3], flat[1::3], flat[2::3]))


def _native(x, *weights, groups: tuple[int, ...]):
    """One kernel call for every weight (values, scale, offset, ...) against x [N, I]: [N, O] each."""
    empty = jnp.zeros((0,), jnp.float32)
    args = [x.astype(jnp.float32)]
    for values, scale, offset in _triples(weights):
        args += [
            values,
            empty if scale is None else scale.astype(jnp.float32),
            empty if offset is None else offset.astype(jnp.float32),
        ]
    # Under shard_map an FFI call needs its operands to vary over the same mesh axes, and says so of its
    # results: the union of theirs (a weight split over `tensor`, x replicated: y varies over `tensor`).
    varying = frozenset().union(*(jax.typeof(a).manual_axis_type.varying for a in args))
    args = [jax.lax.pcast(a, tuple(varying - jax.typeof(a).manual_axis_type.varying), to="varying") for a in args]
    shapes = [(x.shape[0], values.shape[0]) for values in weights[0::3]]
    if varying:
        mesh = jax.typeof(args[0]).sharding  # x's: a 2-D spec on the shard_map's (abstract) mesh
        axis_type = ManualAxisType(varying=varying)
        outs = [jax.ShapeDtypeStruct(s, jnp.float32, sharding=mesh, manual_axis_type=axis_type) for s in shapes]
    else:
        outs = [jax.ShapeDtypeStruct(s, jnp.float32) for s in shapes]
    ys = jax.ffi.ffi_call(TARGET, outs, vmap_method="sequential")(*args, groups=np.asarray(groups, np.int64))
    return [y.astype(x.dtype) for y in ys]


def _reference_many(x, *weights, groups: tuple[int, ...]):
    return [reference(x, v, s, o, group=g) for (v, s, o), g in zip(_triples(weights), groups)]


def linears(x, weights):
    """`linear` of several weights against the same x, in one kernel call on CPU: [y_1, ...].

    `weights` is a sequence of (values, scale, offset, group), each as `linear` takes them. One call
    hands all of their rows to the cores at once (small weights such as k and v alone would run on one
    core); each y equals `linear(x, *weight)` bit for bit.
    """
    groups = tuple(_check(x, v, s, o, g) for v, s, o, g in weights)
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    flat = [a for v, s, o, _ in weights for a in (v, s, o)]
    if available():
        ys = jax.lax.platform_dependent(
            x2,
            *flat,
            cpu=functools.partial(_native, groups=groups),
            default=functools.partial(_reference_many, groups=groups),
        )
    else:
        ys = _reference_many(x2, *flat, groups=groups)
    return [y.reshape(*lead, v.shape[0]) for y, (v, _, _, _) in zip(ys, weights)]


def linear(x, values, scale=None, offset=None, *, group: int | None = None):
    """y = x @ dequantize(values).T in float32 (x and the weight converted exactly), returned in x's dtype.

    x [..., I] float32 or bfloat16; values [O, I] float32, bfloat16, int8, int4 or uint4; for integer
    values scale (and optional offset) float32 [O, ceil(I / group)], group defaulting to I (one scale
    per output channel). Returns [..., O]. The native kernel runs on CPU; elsewhere, or when it cannot
    be built here, `reference` does. Natively, each row of y is a function of its own row of x alone, bit
    for bit, whatever the other rows (batch-invariant).
    """
    return linears(x, [(values, scale, offset, group)])[0]
