"""`--quantize gguf`: a checkpoint's own quantized tensors run as stored, never expanded to float.

The reader hands each quantized tensor over as `QuantizedBlocks` in HF layout ([out, in], groups along
`in`); this module derives the model's `QuantSpec` from them (`stored_spec`) and maps one tensor onto
jaxinfer's declared layout (`stored_leaf`): the same reshapes and transposes `hf_layout` applies to
float tensors, applied to the codes and, with the group axis in place of `in`, to the scales.

A weight kind whose layers are stored in different formats (llama.cpp's Q4_K_M keeps some layers'
v/down in Q6_K) gets one format that holds them all without loss: int8 codes, the finest group, and
an offset if any layer has one (`_widest`, `_widen`).
"""

from __future__ import annotations

import math

import numpy as np

from jaxinfer.checkpoint.errors import CheckpointError
from jaxinfer.checkpoint.quantized_blocks import QuantizedBlocks
from jaxinfer.quant.spec import EMBEDDINGS, PROJECTIONS, QuantSpec, WeightQuant

HF_NAMES = {
    "q": "self_attn.q_proj.weight",
    "k": "self_attn.k_proj.weight",
    "v": "self_attn.v_proj.weight",
    "o": "self_attn.o_proj.weight",
    "gate": "mlp.gate_proj.weight",
    "up": "mlp.up_proj.weight",
    "down": "mlp.down_proj.weight",
}


def hf_tensor(kind: str, layer: int | None) -> str:
    if kind == "embed":
        return "model.embed_tokens.weight"
    if kind == "lm_head":
        return "lm_head.weight"
    return f"model.layers.{layer}.{HF_NAMES[kind]}"


def stored_spec(source) -> QuantSpec:
    """The spec that runs `source`'s quantized tensors as stored; refused when it has none."""
    c = source.config
    weights = []
    for kind in PROJECTIONS + EMBEDDINGS:
        if kind == "lm_head" and (c.tie_embeddings or "lm_head.weight" not in source.names()):
            continue
        layers = [None] if kind in EMBEDDINGS else range(c.num_layers)
        formats = [_format(source.get_quantized(hf_tensor(kind, i))) for i in layers]
        if any(f is None for f in formats):
            continue  # stored float (in some layer at least): runs in the model's float dtype
        wq = _widest(formats)
        if kind == "o" and wq.group < c.head_dim and c.head_dim % wq.group:
            raise CheckpointError(
                f"{source.path}: o_proj groups of {wq.group} straddle heads of {c.head_dim}; "
                "load it without --quantize gguf"
            )
        weights.append((kind, wq))
    if not weights:
        raise CheckpointError(f"{source.path}: --quantize gguf: the file stores no supported quantized weight")
    return QuantSpec("gguf", tuple(sorted(weights)))


def stored_leaf(source, kind: str, layer: int | None, wq: WeightQuant) -> tuple:
    """(codes, scale, offset or None) of one stored tensor in jaxinfer's declared, unpadded layout."""
    c = source.config
    blocks = _widen(source.get_quantized(hf_tensor(kind, layer)), wq)
    e, d = c.hidden_size, c.head_dim
    hq, hk = c.num_heads, c.num_kv_heads

    def to_layout(a):  # a [out, in or groups]
        if kind in ("q", "k", "v"):
            return a.reshape(hq if kind == "q" else hk, d, -1).transpose(2, 0, 1)
        if kind == "o":
            return a.reshape(e, hq, -1).transpose(1, 2, 0)
        if kind == "embed":
            return a
        return a.T  # gate, up, down, lm_head: [out, in] -> [in, out]

    offset = None if blocks.offset is None else to_layout(blocks.offset)
    return to_layout(blocks.values), to_layout(blocks.scale), offset


def _format(blocks: QuantizedBlocks | None) -> WeightQuant | None:
    if blocks is None:
        return None
    return WeightQuant(blocks.kind, blocks.group, blocks.offset is not None)


def _widest(formats: list[WeightQuant]) -> WeightQuant:
    if len(set(formats)) == 1:
        return formats[0]
    group = math.gcd(*(f.group for f in formats))
    return WeightQuant("int8", group, any(f.offset for f in formats))


def _widen(blocks: QuantizedBlocks, wq: WeightQuant) -> QuantizedBlocks:
    """`blocks` in format `wq` (one `_widest` chose to hold it): wider codes, finer groups, zero offsets."""
    values, scale, offset = blocks.values, blocks.scale, blocks.offset
    if wq.kind != blocks.kind:
        values = values.astype(np.int8)
    if wq.group != blocks.group:
        cols = values.shape[1]
        repeat = lambda a: np.repeat(a, blocks.group // wq.group, axis=1)[:, : -(-cols // wq.group)]  # noqa: E731
        scale, offset = repeat(scale), None if offset is None else repeat(offset)
    if wq.offset and offset is None:
        offset = np.zeros_like(scale)
    return QuantizedBlocks(values, scale, offset, wq.group, wq.kind)
