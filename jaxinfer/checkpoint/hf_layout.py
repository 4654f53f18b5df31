"""Maps canonical HF LlamaForCausalLM tensors onto jaxinfer's (unpadded) parameter tree."""

from __future__ import annotations

import numpy as np

from jaxinfer.config import ModelConfig


def logical_leaf_from_hf(source, path: tuple[str, ...]) -> np.ndarray:
    """The unpadded host array for parameter `path`, built from the source's HF-named tensors.

    Layer weights are stacked along a leading `layers` axis (`layer_from_hf` gives one layer); torch
    [out, in] matrices become [in, out]; attention matrices get explicit head axes ([E, H, D] and
    [H, D, E]). Tensor shapes were already checked against the config by the reader
    (`source.expected_shape`), so the reshapes cannot fail on a well-formed source.
    """
    match path:
        case ("embed",):
            return source.get("model.embed_tokens.weight")
        case ("lm_head",):
            return source.get("lm_head.weight").T
        case ("final_norm", "scale"):
            return source.get("model.norm.weight")
        case ("layers", *_):
            return np.stack([layer_from_hf(source, path, i) for i in range(source.config.num_layers)])
    raise KeyError(f"no HF mapping for parameter {'/'.join(path)}")


def layer_from_hf(source, path: tuple[str, ...], i: int) -> np.ndarray:
    """Layer `i`'s slice of the stacked parameter `path` (`("layers", ...)`): one source tensor."""
    c: ModelConfig = source.config
    e, d = c.hidden_size, c.head_dim
    hq, hk = c.num_heads, c.num_kv_heads

    def get(rest):
        return source.get(f"model.layers.{i}.{rest}")

    match path:
        case ("layers", "attn_norm", "scale"):
            return get("input_layernorm.weight")
        case ("layers", "mlp_norm", "scale"):
            return get("post_attention_layernorm.weight")
        case ("layers", "attn", "q"):
            return get("self_attn.q_proj.weight").reshape(hq, d, e).transpose(2, 0, 1)
        case ("layers", "attn", ("k" | "v") as kind):
            return get(f"self_attn.{kind}_proj.weight").reshape(hk, d, e).transpose(2, 0, 1)
        case ("layers", "attn", "o"):
            return get("self_attn.o_proj.weight").reshape(e, hq, d).transpose(1, 2, 0)
        case ("layers", "mlp", ("gate" | "up" | "down") as kind):
            return get(f"mlp.{kind}_proj.weight").T
    raise KeyError(f"no HF mapping for parameter {'/'.join(path)}")
