"""A speculative-decoding draft that reads the target's hidden states (`ModelConfig.feature_head`).

Given the target's final-normed hidden state h_p at the newest position p and the embedding of the
token x_{p+1} sampled there, the head predicts the target's next hidden state:
    h'_{p+1} = blocks(fc [h_p ; e(x_{p+1})]),
and its reduced head (the target's own head columns for the `head_ids` tokens, as in EAGLE-3's
draft vocabulary) turns h'_{p+1} into a greedy proposal for x_{p+2}. Fed its own prediction and
proposal, it proposes x_{p+3}, and so on. It has no attention and no KV cache: everything it needs
is in the target's step (`jaxinfer.engine.head_step`), so unlike a draft model it costs nothing while
it does not propose, and never falls behind.

It is EAGLE's idea without EAGLE's attention layer (so a Hydra-style sequential head): measured on
SmolLM2 (`docs/PERFORMANCE.md`), its first proposal agrees with the target's greedy token more often
than a distilled 2-layer draft's, at a fifth of the bytes read per proposal.

Blocks: x + down(silu(gate(norm(x))) * up(norm(x))), pre-norm residual MLPs. Weights are replicated
(logical axes `draft_in`, `draft_mlp`, `draft_vocab`): the head is small next to its target.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxinfer.config import ModelConfig
from jaxinfer.model.projections import declare

ZEROS = nn.initializers.zeros
ONES = nn.initializers.ones


def _first_ids(key, shape, dtype):
    del key
    return jnp.arange(shape[0], dtype=dtype)


def _rms_norm(x, scale, eps: float):
    x32 = x.astype(jnp.float32)
    return (x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)).astype(x.dtype) * scale


class FeatureHead(nn.Module):
    """(features [..., E], token_rows [..., E]) -> (predicted next features [..., E], head logits
    [..., head_vocab], head_ids i32 [head_vocab]: the token id of each head column)."""

    config: ModelConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, features, token_rows):
        c = self.config
        e, f, blocks = c.hidden_size, c.intermediate_size, c.num_layers
        fc = declare(self, "fc", (2 * e, e), ("draft_in", "embed"), self.dtype)
        norm = declare(self, "block_norm", (blocks, e), ("layers", "norm"), self.dtype, ONES)
        gate = declare(self, "block_gate", (blocks, e, f), ("layers", "embed", "draft_mlp"), self.dtype)
        up = declare(self, "block_up", (blocks, e, f), ("layers", "embed", "draft_mlp"), self.dtype)
        down = declare(self, "block_down", (blocks, f, e), ("layers", "draft_mlp", "embed"), self.dtype, ZEROS)
        head = declare(self, "lm_head", (e, c.head_vocab), ("embed", "draft_vocab"), self.dtype)
        ids = declare(self, "head_ids", (c.head_vocab,), ("draft_vocab",), jnp.int32, _first_ids)
        x = jnp.concatenate([features.astype(self.dtype), token_rows.astype(self.dtype)], axis=-1) @ fc
        for b in range(blocks):
            y = _rms_norm(x, norm[b], c.rms_norm_eps)
            x = x + (jax.nn.silu(y @ gate[b]) * (y @ up[b])) @ down[b]
        logits = jnp.einsum("...e,eh->...h", x, head, preferred_element_type=jnp.float32)
        return x, logits, ids
