"""AWQ-style input scales (Lin et al., 2023) ahead of GPTQ: `--quantize-calibration awq-gptq`.

The inputs of a projection that carry large activations matter most to its output error. Multiplying
a weight's input rows by s (input i by s_i) before quantizing, and dividing the op that feeds those
inputs by s, leaves the float function as it was but gives the busy inputs finer steps within their
groups. s = d^(alpha/2), d the mean square of each input (diag X^T X), scaled so that max(s) * min(s)
= 1; alpha is chosen from `ALPHAS` per layer and per fold by the smallest output error tr(E^T H E)
of round-to-nearest, summed over the projections that share the input. GPTQ then runs on the scaled
weights with H / (s s^T), the Hessian of the scaled inputs.

The folds (`fold_layer`): the attention norm's scale takes 1/s for q, k and v; the MLP norm's for gate
and up; up's output columns for down (act(gate) * up is linear in up). o is not scaled: its inputs are
attention outputs, and the offline search on SmolLM2 chose alpha ~0.03 for it (docs/PERFORMANCE.md).
Inputs no calibration token reached (tensor-parallel MLP padding) keep s = 1.
"""

from __future__ import annotations

import numpy as np

from jaxinfer.quant.gptq import group_starts
from jaxinfer.quant.quantize import quantize
from jaxinfer.quant.spec import QuantSpec, WeightQuant

ALPHAS = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7)
# each fold: what takes 1/s (a norm's scale, or a weight's output columns), the projections whose input
# rows take s, and the Hessian (by projection name) they share
FOLDS = (
    (("attn_norm", "scale"), ("attn", "q", "k", "v"), "q"),
    (("mlp", "up"), ("mlp", "down"), "down"),  # before gate/up: it changes up, which that fold then measures
    (("mlp_norm", "scale"), ("mlp", "gate", "up"), "gate"),
)


def input_scales(d: np.ndarray, alpha: float) -> np.ndarray:
    """s = d^(alpha/2) over the live inputs (d > 0), normalised to max * min = 1; 1 elsewhere."""
    s = np.ones_like(d, dtype=np.float64)
    live = d > 0
    if alpha and live.any():
        s[live] = d[live] ** (alpha / 2)
        s[live] /= np.sqrt(s[live].max() * s[live].min())
    return s


def rounded(w: np.ndarray, quant: WeightQuant, starts: np.ndarray) -> np.ndarray:
    """w [inputs, outputs] quantized by round-to-nearest in groups of inputs starting at `starts`, dequantized."""
    out = np.empty(w.shape, np.float64)
    for g0, g1 in zip(starts, np.append(starts[1:], w.shape[0])):
        codes, scale, offset = quantize(w[g0:g1].astype(np.float32), quant, axis=0)
        out[g0:g1] = codes * scale.astype(np.float64) + (0.0 if offset is None else offset)
    return out


def output_error(w: np.ndarray, s: np.ndarray, h: np.ndarray, quant: WeightQuant, starts: np.ndarray) -> float:
    """tr(E^T H E) of w [inputs, outputs] rounded after scaling its rows by s (and unscaled again)."""
    e = w - rounded(w * s[:, None], quant, starts) / s[:, None]
    return float(np.sum(e * (h @ e)))


def search(weights: list[np.ndarray], h: np.ndarray, quant: WeightQuant, starts: np.ndarray) -> np.ndarray:
    """The s among `ALPHAS` with the smallest output error summed over `weights` (all [inputs, outputs]
    and fed the same inputs, whose X^T X is `h`)."""
    d = np.diag(h)
    best = None
    for alpha in ALPHAS:
        s = input_scales(d, alpha)
        err = sum(output_error(w, s, h, quant, starts) for w in weights)
        if best is None or err < best[0]:
            best = (err, s)
    return best[1]


def fold_layer(layer: dict, hessians: dict, quant: QuantSpec) -> None:
    """Scales one decoder layer's float params in place (numpy arrays in `layer`, nested as the model
    declares them) and the Hessians (by projection name) to match, for the projections' formats in
    `quant`."""
    for (owner, leaf), (module, *kinds), hname in FOLDS:
        h = hessians[hname]
        flat = {k: layer[module][k].reshape(h.shape[0], -1).astype(np.float64) for k in kinds}
        wq = quant.get(kinds[0])
        starts = group_starts(layer[module][kinds[0]].shape[:1], wq.group)  # q/k/v, gate/up, down: one input axis
        s = search([flat[k] for k in kinds], h, wq, starts)
        for k in kinds:
            w = layer[module][k]
            layer[module][k] = (flat[k] * s[:, None]).reshape(w.shape).astype(w.dtype)
        fed = layer[owner][leaf]
        if leaf == "scale":  # a norm: normed * scale
            layer[owner][leaf] = (fed / s).astype(fed.dtype)
        else:  # a weight [inputs, outputs]: its output columns
            layer[owner][leaf] = (fed.reshape(fed.shape[0], -1) / s).reshape(fed.shape).astype(fed.dtype)
        hessians[hname] = h / np.outer(s, s)
