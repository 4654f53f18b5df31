"""The quantizers, one weight at a time: on the host (numpy, from a checkpoint's float tensors) or on
device (jax arrays, inside jit: a float native checkpoint restored with `--quantize`).

int8 is symmetric: codes round(w / scale) clipped to [-127, 127], the scale chosen per group among
fractions of max|w| / 127 (`INT8_CLIP`) by the smallest squared error: on SmolLM2 plain absmax
scales cost +1.03% perplexity over the projections, the searched ones +0.29% (docs/PERFORMANCE.md),
since a few channels hold outliers 28x their RMS. uint4 is asymmetric with a per-group offset: each
group's range [lo, hi] maps onto codes 0..15, and the range is chosen among a few shrunk candidates
by the smallest squared error (clipping one outlier of a group of 128 usually buys a finer step for
the other 127), as llama.cpp's Q4_1/Q4_K search does. `jaxinfer.quant.gptq` is the calibrated
alternative.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jaxinfer.quant.spec import WeightQuant

SHRINK = (1.0, 0.95, 0.9, 0.85, 0.8)  # candidate fractions of a group's range kept (uint4)
INT8_CLIP = tuple(1.0 - 0.02 * i for i in range(26))  # candidate fractions of max|w| (int8): 1.0 ... 0.5


def quantize(
    w: np.ndarray, quant: WeightQuant, axis: int, importance: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """float w -> (codes, scale, offset or None) with groups along `axis` (see `WeightQuant`); numpy in,
    numpy out (codes int8 or uint8), jax in, jax out (codes in the format's dtype). `importance` (one
    value per element along `axis`, e.g. its input's mean square activation) weights the squared error
    that chooses each group's scale, as llama.cpp's importance matrix does."""
    xp = jnp if isinstance(w, jax.Array) else np
    w = xp.moveaxis(w.astype(xp.float32), axis, -1)
    length = w.shape[-1]
    group = min(quant.group, length)
    groups = -(-length // group)
    # edge padding completes a short last group without changing its min, max or absmax
    padded = xp.pad(w, [(0, 0)] * (w.ndim - 1) + [(0, groups * group - length)], mode="edge")
    blocks = padded.reshape(w.shape[:-1] + (groups, group))
    valid = (np.arange(groups * group) < length).reshape(groups, group)  # the last group's padding: no weight
    if importance is not None:
        valid = valid * np.pad(np.asarray(importance, np.float64), (0, groups * group - length)).reshape(groups, group)
    if quant.kind == "int8":
        codes, scale, offset = _symmetric(xp, blocks, 127, valid, INT8_CLIP)
    elif quant.kind == "int4":
        codes, scale, offset = _symmetric(xp, blocks, 7, valid)
    else:
        codes, scale, offset = _asymmetric(xp, blocks, 15, valid)
    host_dtype = np.uint8 if quant.kind == "uint4" else np.int8
    codes = codes.reshape(padded.shape)[..., :length].astype(quant.dtype if xp is jnp else host_dtype)
    back = [xp.moveaxis(a, -1, axis) for a in (codes, scale, offset)]
    if not quant.offset:
        back[2] = None
    return tuple(back)


def _symmetric(xp, blocks, qmax: int, valid, clips=(1.0,)):
    """Codes and the scale among `clips` x max|w| / qmax with the smallest squared error per group. The
    scale is chosen first and the codes computed once from it; on device the candidates run as one loop
    body (26 unrolled ones compiled 2.4x and ran 1.8x slower for a SmolLM2 MLP weight)."""
    absmax = xp.abs(blocks).max(axis=-1)

    def codes_for(scale):
        safe = xp.where(scale > 0, scale, 1.0)
        return xp.clip(xp.rint(blocks / safe[..., None]), -qmax, qmax)

    def candidate(clip):  # (scale, squared error) per group
        scale = absmax * clip / qmax
        return scale, (((codes_for(scale) * scale[..., None] - blocks) ** 2) * valid).sum(axis=-1)

    def better_of(best, new):  # the first candidate keeps a tie
        wins = new[1] < best[1]
        return xp.where(wins, new[0], best[0]), xp.minimum(new[1], best[1])

    best = candidate(clips[0])
    if xp is jnp and len(clips) > 1:
        rest = jnp.asarray(clips[1:], jnp.float32)
        best = jax.lax.fori_loop(0, len(clips) - 1, lambda i, b: better_of(b, candidate(rest[i])), best)
    else:
        for clip in clips[1:]:
            best = better_of(best, candidate(clip))
    return codes_for(best[0]), best[0].astype(xp.float32), xp.zeros_like(absmax)


def _asymmetric(xp, blocks, qmax: int, valid):
    lo0, hi0 = blocks.min(axis=-1), blocks.max(axis=-1)
    mid = (lo0 + hi0) / 2
    best = None
    for keep in SHRINK:
        lo, hi = mid - (mid - lo0) * keep, mid + (hi0 - mid) * keep
        scale = (hi - lo) / qmax
        safe = xp.where(scale > 0, scale, 1.0)
        codes = xp.clip(xp.rint((blocks - lo[..., None]) / safe[..., None]), 0, qmax)
        err = (((codes * scale[..., None] + lo[..., None] - blocks) ** 2) * valid).sum(axis=-1)
        if best is None:
            best = [codes, scale, lo, err]
        else:
            better = err < best[3]
            best[0] = xp.where(better[..., None], codes, best[0])
            for i, new in ((1, scale), (2, lo), (3, err)):
                best[i] = xp.where(better, new, best[i])
    return best[0], best[1].astype(xp.float32), best[2].astype(xp.float32)
