"""Calibrated quantization of a loaded float model (`--quantize-calibration gptq` or `awq-gptq`).

The calibration text (`jaxinfer/quant/calibration_text.txt`, public domain, not the perplexity
text) is tokenized and run through the model one decoder layer at a time, as GPTQ does: each layer
runs once with its float weights while a tapping `Projections` records X^T X of every projection's
input (q, k and v share one, as gate and up do); with `awq-gptq` the layer's AWQ input scales are
folded in (`jaxinfer.quant.awq`: the norms' scales and up's columns change, the function does not);
its projections are quantized by `gptq` (with `awq-gptq`, each group's range searched with its inputs'
activations as weights); and the layer runs again with the quantized weights to give the next layer
its input, so later layers calibrate on the errors of earlier ones. Embeddings and lm_head are
quantized as without calibration.
Every token counts in X^T X, a row's first (an attention sink, its activations hundreds of times the
others') too: leaving it out let GPTQ wreck it (SmolLM2 down projections: +100% perplexity).
The weights stay padded to the mesh's layout throughout (padding is dead input to GPTQ), and the
result is the params tree `--quantize` builds, placed with the same shardings.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import pathlib
import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxinfer.config import ConfigError
from jaxinfer.model import params as P
from jaxinfer.model.attention import DenseCausal
from jaxinfer.model.forward import ShardedModel
from jaxinfer.model.llama import DecoderLayer
from jaxinfer.model.projections import TokenMajor
from jaxinfer.quant import awq
from jaxinfer.quant.gptq import gptq, group_starts
from jaxinfer.quant.quantize import quantize
from jaxinfer.quant.spec import INPUT_AXES, PROJECTIONS, QuantSpec

log = logging.getLogger(__name__)

TEXT = pathlib.Path(__file__).resolve().parents[1] / "quant" / "calibration_text.txt"
ROW = 512  # calibration tokens per row
# tokens at the start of each row left out of X^T X: a row's first token is an attention sink whose
# activations are hundreds of times the others', so it alone would set H and GPTQ would fit it at the
# cost of every other token (on SmolLM2, GPTQ of v with it: +48% perplexity, worse than rounding)
# the projection whose input each kind shares
HESSIAN_OF = {"q": "q", "k": "q", "v": "q", "o": "o", "gate": "gate", "up": "gate", "down": "down"}
MODULE_OF = {"q": "attn", "k": "attn", "v": "attn", "o": "attn", "gate": "mlp", "up": "mlp", "down": "mlp"}


@dataclasses.dataclass(frozen=True)
class _Tap:
    """A weight whose projection records X^T X of its input under `name` (in the `calib` collection)."""

    w: object
    module: object
    name: str

    @property
    def shape(self):
        return self.w.shape


@dataclasses.dataclass(frozen=True)
class Tapping(TokenMajor):
    """Token-major projections that sow X^T X (float32) of the inputs of q, o, gate and down."""

    def weight(self, module, name, shape, axes, dtype):
        w = super().weight(module, name, shape, axes, dtype)
        return _Tap(w, module, name) if HESSIAN_OF.get(name) == name else w

    def apply(self, x, w, inputs: int):
        if isinstance(w, _Tap):
            flat = x.reshape(-1, math.prod(w.shape[:inputs])).astype(jnp.float32)
            w.module.sow("calib", w.name, flat.T @ flat)
            w = w.w
        return super().apply(x, w, inputs)


def token_rows(ids: list[int], rows: int | None = None) -> np.ndarray:
    """The calibration text's token `ids` as [rows, ROW] (its whole rows; default all)."""
    n = len(ids) // ROW if rows is None else rows
    if n < 1 or n * ROW > len(ids):
        raise ConfigError(f"calibration text {TEXT}: {len(ids)} tokens, fewer than {max(n, 1)} rows of {ROW}")
    return np.asarray(ids[: n * ROW], np.int32).reshape(n, ROW)


def quantize_calibrated(model: ShardedModel, quant: QuantSpec, tokens: np.ndarray) -> ShardedModel:
    """`model` (float, scan layer loop) with the weights `quant` names quantized, projections by GPTQ
    on `tokens` [rows, length]; `model` is consumed."""
    if model.layer_loop != "scan" or model.quant.enabled:
        raise ValueError("calibration takes a float model with the scan layer loop")
    start = time.perf_counter()
    config, layout, mesh = model.config, model.layout, model.mesh
    axes = dict(P.flatten(P.logical_axes(config, layout, model.dtype, quant)))
    target = dict(P.flatten(P.abstract_params(config, layout, model.dtype, mesh, quant)))
    flat = dict(P.flatten(model.params))
    stacked = model.params["layers"]
    positions = jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)
    run = _layer_runner(config, layout, model.dtype)
    x = jnp.take(model.params["embed"], jnp.asarray(tokens), axis=0)
    per_layer: dict[tuple, list] = {}
    with_awq = quant.calibration == "awq-gptq"
    for i in range(config.num_layers):
        layer = jax.tree.map(lambda a, i=i: np.asarray(a[i]), stacked)
        _, calib = run(layer, x, positions)
        hessians = layer_hessians(calib)
        if with_awq:
            awq.fold_layer(layer, hessians, quant)
            for module in ("attn_norm", "mlp_norm"):
                per_layer.setdefault(("layers", module, "scale"), []).append(layer[module]["scale"])
        for kind in PROJECTIONS:
            wq = quant.get(kind)
            if wq is None:
                continue
            path = ("layers", MODULE_OF[kind], kind)
            w = np.asarray(layer[MODULE_OF[kind]][kind], np.float32)
            inputs = INPUT_AXES.get(kind, 1)
            n_in = math.prod(w.shape[:inputs])
            starts = group_starts(w.shape[:inputs], wq.group)
            codes, scale, offset, deq = gptq(
                w.reshape(n_in, -1), hessians[HESSIAN_OF[kind]], wq, starts, weighted_ranges=with_awq
            )
            grouped = (w.shape[: inputs - 1]) + (-1,) + w.shape[inputs:]
            parts = [codes.reshape(w.shape), scale.reshape(grouped)] + (
                [] if offset is None else [offset.reshape(grouped)]
            )
            for p, a in zip(P.quantized_paths(path, wq), parts):
                per_layer.setdefault(p, []).append(P.pad_to_shape(a, target[p].shape[1:]))
            layer[MODULE_OF[kind]][kind] = jnp.asarray(deq.reshape(w.shape), model.dtype)
        x, _ = run(layer, x, positions)
        log.debug("calibrated layer %d (%.1fs)", i, time.perf_counter() - start)
    out = {}
    for path, spec in target.items():
        if path in per_layer:
            value = P.place(np.stack(per_layer[path]), spec.sharding, spec.dtype)
        elif path in flat and quant.get(path[-1]) is None:
            value = flat[path]
        else:
            continue  # the embeddings' codes, scales and offsets
        P.set_path(out, path, value)
    for name in ("embed", "lm_head"):
        wq = quant.get(name)
        if wq is not None and (name,) in flat:
            grouped = P.grouped_axis(axes[(f"{name}_scale",)])
            parts = [a for a in quantize(np.asarray(flat[(name,)], np.float32), wq, grouped) if a is not None]
            for p, a in zip(P.quantized_paths((name,), wq), parts):
                P.set_path(out, p, P.place(a, target[p].sharding, target[p].dtype))
    log.info(
        "--quantize-calibration %s: %d layers in %.1fs",
        quant.calibration,
        config.num_layers,
        time.perf_counter() - start,
    )
    return dataclasses.replace(model, params=out, quant=quant)


def layer_hessians(calib) -> dict[str, np.ndarray]:
    """X^T X (float64) of each input a layer run recorded, by the projection that owns it (q, o, gate, down)."""
    return {name: np.asarray(calib[MODULE_OF[name]][name][0], np.float64) for name in set(HESSIAN_OF.values())}


def _layer_runner(config, layout, dtype):
    return _runner(config, layout, jnp.dtype(dtype))


@functools.cache
def _runner(config, layout, dtype):
    module = DecoderLayer(config, layout, dtype, Tapping())

    @jax.jit
    def run(layer_params, x, positions):
        ctx = DenseCausal(positions)
        ((y, _), _), state = module.apply({"params": layer_params}, (x, None), None, positions, ctx, mutable=["calib"])
        return y, state["calib"]

    return run
