"""A weight as a checkpoint stores it quantized: integer codes plus per-group scales (and offsets).

This is the host-side (numpy) form of issue #16's quantized-weight representation, as a reader hands
it over: `values` unpacked one code per element, in the float weight's own HF layout (`[out, in]`),
with groups of `group` consecutive elements along the input (last) dimension. The loader decides how
the codes are stored on device (int8, int4, uint4). `dequantize` is the float32 meaning of it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import numpy as np

KINDS = {"int8": (np.int8, -128, 127), "int4": (np.int8, -8, 7), "uint4": (np.uint8, 0, 15)}


@dataclasses.dataclass(frozen=True, eq=False)
class QuantizedBlocks:
    """Dequantized weight = `values * scale[group] + offset[group]` (no offset term when it is None)."""

    values: np.ndarray  # [out, in] int8 (kinds int8, int4: -8..7) or uint8 (kind uint4: 0..15)
    scale: np.ndarray  # [out, ceil(in / group)] float32
    offset: np.ndarray | None  # like `scale`, or None for symmetric formats
    group: int  # elements per group along `in`; the last group of a row may be shorter
    kind: str  # "int8", "int4" or "uint4": the code range of `values`

    def __post_init__(self):
        dtype, _, _ = KINDS[self.kind]
        rows, cols = self.values.shape
        groups = (rows, -(-cols // self.group))
        assert self.values.dtype == dtype, (self.kind, self.values.dtype)
        assert self.scale.shape == groups and self.scale.dtype == np.float32, (self.scale.shape, groups)
        assert self.offset is None or (self.offset.shape == groups and self.offset.dtype == np.float32)

    @property
    def shape(self) -> tuple[int, int]:
        return self.values.shape

    def map_rows(self, fn: Callable[[np.ndarray], np.ndarray]) -> QuantizedBlocks:
        """The same weight with `fn` (a permutation of output channels, i.e. of rows) applied to every array."""
        return dataclasses.replace(
            self,
            values=fn(self.values),
            scale=fn(self.scale),
            offset=None if self.offset is None else fn(self.offset),
        )


def dequantize(q: QuantizedBlocks) -> np.ndarray:
    """float32 `[out, in]`: each code times its group's scale, plus its group's offset (float32 arithmetic)."""
    rows, cols = q.values.shape
    n_groups = q.scale.shape[1]
    if cols == n_groups * q.group:  # whole groups: broadcast per group without materialising the scales
        out = q.values.reshape(rows, n_groups, q.group).astype(np.float32)
        out *= q.scale[:, :, None]
        if q.offset is not None:
            out += q.offset[:, :, None]
        return out.reshape(rows, cols)
    out = q.values.astype(np.float32)
    out *= np.repeat(q.scale, q.group, axis=1)[:, :cols]
    if q.offset is not None:
        out += np.repeat(q.offset, q.group, axis=1)[:, :cols]
    return out
