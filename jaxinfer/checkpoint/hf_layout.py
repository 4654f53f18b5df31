"""Maps canonical HF LlamaForCausalLM tensors onto jaxinfer's (unpadded) parameter tree."""
from __future__ import annotations

import numpy as np

from jaxinfer.checkpoint.errors import CheckpointError
from jaxinfer.config import ModelConfig


def _expect(source, name: str, shape: tuple[int, ...]) -> np.ndarray:
    array = source.get(name)
    if tuple(array.shape) != tuple(shape):
        raise CheckpointError(f"{source.path}: tensor {name} has shape {tuple(array.shape)}, "
                              f"expected {tuple(shape)} for model config {source.config.name!r}")
    return array


def logical_leaf_from_hf(source, path: tuple[str, ...]) -> np.ndarray:
    """The unpadded host array for parameter `path`, built from the source's HF-named tensors.

    Layer weights are stacked along a leading `layers` axis; torch [out, in] matrices become
    [in, out]; attention matrices get explicit head axes ([E, H, D] and [H, D, E]).
    """
    c: ModelConfig = source.config
    e, f, d, v = c.hidden_size, c.intermediate_size, c.head_dim, c.vocab_size
    hq, hk = c.num_heads, c.num_kv_heads

    def per_layer(fn):
        return np.stack([fn(i) for i in range(c.num_layers)])

    def lname(i, rest):
        return f"model.layers.{i}.{rest}"

    match path:
        case ("embed",):
            return _expect(source, "model.embed_tokens.weight", (v, e))
        case ("lm_head",):
            return _expect(source, "lm_head.weight", (v, e)).T
        case ("final_norm", "scale"):
            return _expect(source, "model.norm.weight", (e,))
        case ("layers", "attn_norm", "scale"):
            return per_layer(lambda i: _expect(source, lname(i, "input_layernorm.weight"), (e,)))
        case ("layers", "mlp_norm", "scale"):
            return per_layer(lambda i: _expect(source, lname(i, "post_attention_layernorm.weight"), (e,)))
        case ("layers", "attn", "q"):
            return per_layer(lambda i: _expect(source, lname(i, "self_attn.q_proj.weight"), (hq * d, e))
                             .reshape(hq, d, e).transpose(2, 0, 1))
        case ("layers", "attn", ("k" | "v") as kind):
            return per_layer(lambda i: _expect(source, lname(i, f"self_attn.{kind}_proj.weight"), (hk * d, e))
                             .reshape(hk, d, e).transpose(2, 0, 1))
        case ("layers", "attn", "o"):
            return per_layer(lambda i: _expect(source, lname(i, "self_attn.o_proj.weight"), (e, hq * d))
                             .reshape(e, hq, d).transpose(1, 2, 0))
        case ("layers", "mlp", ("gate" | "up") as kind):
            return per_layer(lambda i: _expect(source, lname(i, f"mlp.{kind}_proj.weight"), (f, e)).T)
        case ("layers", "mlp", "down"):
            return per_layer(lambda i: _expect(source, lname(i, "mlp.down_proj.weight"), (e, f)).T)
    raise KeyError(f"no HF mapping for parameter {'/'.join(path)}")
