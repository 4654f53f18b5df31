"""A step's inputs as one int32 array: what crosses to the device each step.

`HostBatchBuilder` fills ~31 small numpy arrays per step. Placing them one by one cost ~4-5 ms of host
time per step on a 2-core CPU (jax.device_put of the dict: each array pays the sharding checks and
the transfer setup), about an eighth of a one-token SmolLM2 step, taken from the cores that run it. So
the host packs them, side by side along a row per data shard, into one [D, words] int32 array (float32
and uint32 fields bit for bit, booleans as 0/1), one transfer, and the jitted step unpacks them with
static slices (free: views that XLA fuses into their users).

The layout (each field's name, dtype and per-shard shape, in the builder's order) is static: it is the
pytree's metadata, so a step is traced per layout, which the bucket already fixes.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

from jaxinfer.engine.step_inputs import HostBatchBuilder, StepInputs
from jaxinfer.sharding import logical_sharding

# field: (name, numpy dtype name, shape after the leading data-shard axis)
Layout = tuple[tuple[str, str, tuple[int, ...]], ...]
_WORD = np.dtype(np.int32)


def layout_of(host: dict[str, np.ndarray]) -> Layout:
    return tuple((name, a.dtype.name, a.shape[1:]) for name, a in host.items())


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class PackedInputs:
    words: jax.Array  # int32 [D, sum of the fields' per-shard sizes]
    layout: Layout = dataclasses.field(metadata=dict(static=True))

    @classmethod
    def pack(cls, host: dict[str, np.ndarray]) -> PackedInputs:
        """The host arrays (each [D, ...], int32 / uint32 / float32 / bool) as one int32 numpy array."""
        d = next(iter(host.values())).shape[0]
        parts = [_as_words(a).reshape(d, -1) for a in host.values()]
        return cls(np.concatenate(parts, axis=1), layout_of(host))

    def unpack(self) -> StepInputs:
        """The fields again, inside the jitted step (or on host numpy arrays, for checks)."""
        xp = jnp if isinstance(self.words, jax.Array) else np
        d = self.words.shape[0]
        fields, at = {}, 0
        for name, dtype, shape in self.layout:
            size = math.prod(shape)
            word = self.words[:, at : at + size].reshape((d, *shape))
            at += size
            fields[name] = _from_words(xp, word, np.dtype(dtype))
        return StepInputs.from_flat(fields)


def input_sharding(mesh):
    """The sharding of the packed inputs: rows split over the data shards."""
    return logical_sharding(mesh, ("batch", None))


def abstract_inputs(builder: HostBatchBuilder, mesh, key) -> PackedInputs:
    """The idle inputs of step `key` (a bucket, or its verify variant), packed, as a sharded
    ShapeDtypeStruct: what a step is lowered and compiled for."""
    packed = PackedInputs.pack(builder.idle(key))
    words = jax.ShapeDtypeStruct(packed.words.shape, _WORD, sharding=input_sharding(mesh))
    return PackedInputs(words, packed.layout)


def _as_words(a: np.ndarray) -> np.ndarray:
    if a.dtype == np.bool_:
        return a.astype(_WORD)
    if a.dtype.itemsize != 4:
        raise TypeError(f"step input of dtype {a.dtype}: only 4-byte types and booleans are packed")
    return np.ascontiguousarray(a).view(_WORD)


def _from_words(xp, word, dtype: np.dtype):
    if dtype == np.bool_:
        return word != 0
    if dtype == _WORD:
        return word
    if xp is np:
        return word.view(dtype)
    return jax.lax.bitcast_convert_type(word, dtype)
