"""Vectorised on-device sampling, one row per sequence.

Each row carries its own parameters. temperature == 0 means greedy. Filters apply in the order
top-k, top-p (nucleus), min-p, all on the temperature-scaled distribution. The random draw for a
row uses `fold_in(key(seed), position)`: it depends only on the request's seed and the position of
the token being sampled, never on the slot or the batch around it.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class SamplingArrays:
    """Per-row sampling parameters, all shaped [rows]."""

    temperature: jax.Array  # f32; 0 = greedy
    top_k: jax.Array        # i32; 0 = off
    top_p: jax.Array        # f32 in (0, 1]; 1 = off
    min_p: jax.Array        # f32 in [0, 1); 0 = off
    seed: jax.Array         # u32
    position: jax.Array     # i32, absolute position of the token being sampled


def sample(logits: jax.Array, p: SamplingArrays) -> tuple[jax.Array, jax.Array]:
    """logits f32 [rows, vocab] -> (token ids i32 [rows], logprob of each under the raw model f32 [rows])."""
    logits = logits.astype(jnp.float32)
    greedy = p.temperature <= 0.0
    best = jnp.argmax(logits, axis=-1).astype(jnp.int32)

    def draw(logits):
        scaled = logits / jnp.where(greedy, 1.0, p.temperature)[:, None]
        keys = jax.vmap(lambda s, pos: jax.random.fold_in(jax.random.key(s), pos))(p.seed, p.position)
        drawn = jax.vmap(jax.random.categorical)(keys, _filter(scaled, p)).astype(jnp.int32)
        return jnp.where(greedy, best, drawn)

    # an all-greedy batch skips the random draw (a Gumbel sample per vocabulary entry per row)
    tokens = jax.lax.cond(jnp.all(greedy), lambda _: best, draw, logits)
    logprobs = jnp.take_along_axis(jax.nn.log_softmax(logits, axis=-1), tokens[:, None], axis=-1)[:, 0]
    return tokens, logprobs


def _filter(scaled: jax.Array, p: SamplingArrays) -> jax.Array:
    """Sets logits outside the top-k / nucleus / min-p set to -inf (the best token always survives).

    Each filter keeps a prefix of the tokens sorted by logit, so together they keep the tokens whose
    logit is >= the smallest kept sorted logit: one sort per row, no inverse permutation. Skipped
    entirely (no sort) when no row asks for a filter.
    """
    active = jnp.any((p.top_k > 0) | (p.top_p < 1.0) | (p.min_p > 0.0))
    return jax.lax.cond(active, _apply_filters, lambda s, _: s, scaled, p)


def _apply_filters(scaled: jax.Array, p: SamplingArrays) -> jax.Array:
    vocab = scaled.shape[-1]
    sorted_logits = -jnp.sort(-scaled, axis=-1)  # descending
    rank = jnp.arange(vocab)[None, :]
    k = jnp.where(p.top_k > 0, jnp.minimum(p.top_k, vocab), vocab)[:, None]
    keep = rank < k
    probs = jax.nn.softmax(jnp.where(keep, sorted_logits, -jnp.inf), axis=-1)
    before = jnp.cumsum(probs, axis=-1) - probs  # probability mass ranked strictly above this token
    keep &= before < p.top_p[:, None]
    keep &= probs >= p.min_p[:, None] * probs[:, :1]
    count = jnp.maximum(jnp.sum(keep, axis=-1), 1)
    cutoff = jnp.take_along_axis(sorted_logits, (count - 1)[:, None], axis=-1)
    return jnp.where(scaled >= cutoff, scaled, -jnp.inf)
