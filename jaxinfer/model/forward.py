"""A loaded model (config, layout, sharded params) and its dense forward pass.

`ShardedModel.logits` runs a causal pass over whole token rows with no KV cache: the function
parity tests and scoring use. The engine drives the same `Llama` module with a paged-cache context.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxinfer.config import ModelConfig
from jaxinfer.model import cpu_layout
from jaxinfer.model.attention import DenseCausal
from jaxinfer.model.feature_head import FeatureHead
from jaxinfer.model.layout import ModelLayout
from jaxinfer.model.llama import Llama
from jaxinfer.model.projections import TokenMajor
from jaxinfer.native import matmul
from jaxinfer.platform import mesh_platform, pallas_interpret
from jaxinfer.quant.spec import NONE, QuantSpec
from jaxinfer.sharding import ceil_to, logical_sharding


@dataclasses.dataclass
class ShardedModel:
    """Everything needed to run the model on a mesh."""

    config: ModelConfig
    layout: ModelLayout
    mesh: Any
    params: dict
    dtype: Any = jnp.float32
    source: str = ""
    tokenizer_path: str | None = None
    layer_loop: str = "scan"  # "scan": stacked layer params (checkpoint layout); "unrolled": one tree per layer
    quant: QuantSpec = NONE  # which weights are quantized, and how (`jaxinfer.quant`)

    @property
    def module(self) -> Llama:
        """The Flax module for this model's layer loop: `unrolled` params use the CPU layout's
        output-major projections (`jaxinfer.model.cpu_layout`), `scan` params the checkpoint's. A feature
        head (`jaxinfer.model.feature_head`) is the same module in either."""
        if self.config.feature_head:
            return FeatureHead(self.config, self.dtype)
        if self.layer_loop == "unrolled":
            native = self.mesh.devices.size == 1 and mesh_platform(self.mesh) == "cpu" and matmul.available()
            proj = cpu_layout.OutputMajor(quant=self.quant, native=native)
        else:
            proj = TokenMajor(quant=self.quant)
        return Llama(self.config, self.layout, self.dtype, self.layer_loop, proj)

    def with_layer_loop(self, kind: str) -> ShardedModel:
        """This model with `kind` ("scan" or "unrolled") layer params; itself when it has them already.

        scan -> unrolled splits the stacked params on device one weight kind at a time and consumes
        them (this object must not be used afterwards). The reverse is not needed by anything
        (checkpoints are written from sources, never from a loaded model).
        """
        if kind == self.layer_loop:
            return self
        if self.config.feature_head:  # no decoder layers: the same params in either loop
            return dataclasses.replace(self, layer_loop=kind)
        if (self.layer_loop, kind) != ("scan", "unrolled"):
            raise ValueError(
                f"this model's params are already {self.layer_loop} (only scan -> unrolled converts); "
                f"load the model again for a {kind} layer loop"
            )
        return dataclasses.replace(self, params=cpu_layout.unroll(self.params, self.config.num_layers), layer_loop=kind)

    def logits(self, tokens, positions=None, attention: str = "xla") -> np.ndarray:
        """tokens int [B, T] (rows right-padded with any id where positions is -1) -> float32 [B, T, vocab].

        Rows and columns are padded internally to multiples of the `data` and `sequence` axes.
        `attention="pallas"` uses the Pallas flash attention kernel (see `DenseCausal`).
        """
        if attention not in ("xla", "pallas"):
            raise ValueError(f"attention={attention!r}: must be xla or pallas")
        tokens = np.asarray(tokens, dtype=np.int32)
        b, t = tokens.shape
        if positions is None:
            positions = np.broadcast_to(np.arange(t, dtype=np.int32), (b, t))
        positions = np.asarray(positions, dtype=np.int32)
        bp, tp = ceil_to(b, self.mesh.shape["data"]), ceil_to(t, self.mesh.shape["sequence"])
        tok = np.zeros((bp, tp), np.int32)
        pos = np.full((bp, tp), -1, np.int32)
        tok[:b, :t], pos[:b, :t] = tokens, positions
        sharding = logical_sharding(self.mesh, ("batch", "length"), tok.shape)
        fn = _dense_forward(self.module, self.mesh, attention == "pallas", pallas_interpret(self.mesh))
        out = fn(self.params, jax.device_put(tok, sharding), jax.device_put(pos, sharding))
        return np.asarray(out)[:b, :t]


@functools.cache
def _dense_forward(module: Llama, mesh, kernel: bool, interpret: bool):
    @jax.jit
    def forward(params, tokens, positions):
        ctx = DenseCausal(positions, mesh, kernel, interpret)
        logits, _ = module.apply({"params": params}, tokens, positions, ctx)
        return logits

    return forward
