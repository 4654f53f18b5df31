"""`QWeight`: a quantized weight as the model sees it, and its dequantization in XLA.

On TPU and GPU, XLA fuses the dequantization (a convert, a multiply and an add) into the consumer
matmul's operand, so HBM holds and streams the codes; on CPU the model's output-major projections call
the native kernel instead (`jaxinfer.quant.matmul`).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp

from jaxinfer.quant.spec import WeightQuant


@dataclasses.dataclass(frozen=True)
class QWeight:
    """codes (the float weight's shape), scale and offset (codes' shape with the grouped axis `axis` cut
    to its group count), the format, and the grouped axis's index in all three."""

    codes: Any
    scale: Any
    offset: Any  # None for symmetric formats
    quant: WeightQuant
    axis: int

    @property
    def shape(self):
        return self.codes.shape

    @property
    def ndim(self):
        return self.codes.ndim

    @property
    def T(self):  # noqa: N802 (numpy's name)
        """The transpose of a 2-D weight (a tied embedding table used as the vocabulary head)."""
        flip = lambda a: None if a is None else a.T  # noqa: E731
        return QWeight(self.codes.T, flip(self.scale), flip(self.offset), self.quant, 1 - self.axis % 2)

    def dequantize(self, dtype=jnp.float32):
        """The float weight: codes * scale (+ offset), each group's scale repeated along `axis`."""
        length = self.codes.shape[self.axis]
        group = min(self.quant.group, length)
        w = self.codes.astype(jnp.float32) * expand_groups(self.scale, self.axis, length, group)
        if self.offset is not None:
            w = w + expand_groups(self.offset, self.axis, length, group)
        return w.astype(dtype)

    def rows(self, ids, dtype):
        """Dequantized rows `ids` of a [rows, features] table grouped along its last axis (the embedding
        lookup: gather codes and scales, then dequantize only what was gathered)."""
        codes = jnp.take(self.codes, ids, axis=0)
        gathered = QWeight(
            codes,
            jnp.take(self.scale, ids, axis=0),
            None if self.offset is None else jnp.take(self.offset, ids, axis=0),
            self.quant,
            self.axis + ids.ndim - 1 if self.axis >= 0 else self.axis,  # gathered ids replace axis 0
        )
        return gathered.dequantize(dtype)


def expand_groups(per_group, axis: int, length: int, group: int):
    """[..., G, ...] -> [..., length, ...]: each group's value repeated over its `group` elements (the
    last group may be shorter)."""
    groups = per_group.shape[axis]
    full = jnp.repeat(per_group, group, axis=axis, total_repeat_length=groups * group)
    if groups * group == length:
        return full
    return jnp.take(full, jnp.arange(length), axis=axis)


def materialize(w, dtype):
    """A weight as a float array: a `QWeight` dequantized, anything else as it is."""
    return w.dequantize(dtype) if isinstance(w, QWeight) else w
