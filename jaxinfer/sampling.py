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
    top_k: jax.Array  # i32; 0 = off
    top_p: jax.Array  # f32 in (0, 1]; 1 = off
    min_p: jax.Array  # f32 in [0, 1); 0 = off
    seed: jax.Array  # u32
    position: jax.Array  # i32, absolute position of the token being sampled
    logprobs: jax.Array  # bool, the caller wants the sampled token's logprob (else it is returned as 0)


def sample(logits: jax.Array, p: SamplingArrays) -> tuple[jax.Array, jax.Array]:
    """logits f32 [rows, vocab] -> (token ids i32 [rows], logprob of each under the raw model f32 [rows])."""
    logits = logits.astype(jnp.float32)
    greedy = p.temperature <= 0.0
    best = greedy_tokens(logits)

    def draw(logits):
        scaled = logits / jnp.where(greedy, 1.0, p.temperature)[:, None]
        keys = jax.vmap(lambda s, pos: jax.random.fold_in(jax.random.key(s), pos))(p.seed, p.position)
        drawn = jax.vmap(jax.random.categorical)(keys, _filter(scaled, p)).astype(jnp.int32)
        return jnp.where(greedy, best, drawn)

    # an all-greedy batch skips the random draw (a Gumbel sample per vocabulary entry per row)
    tokens = jax.lax.cond(jnp.all(greedy), lambda _: best, draw, logits)
    # the log-sum-exp over the vocabulary costs an exp per entry: only when some row asked for it
    logprobs = jax.lax.cond(jnp.any(p.logprobs), _token_logprobs, lambda *_: jnp.zeros(tokens.shape), logits, tokens)
    return tokens, logprobs


def greedy_tokens(logits: jax.Array, block: int = 128) -> jax.Array:
    """argmax over the last axis: the first index of the maximum, as jnp.argmax (NaN logits: unspecified).

    In two passes, over the maxima of blocks of `block` entries and then within the winning block:
    XLA:CPU's argmax (a variadic reduce over value and index) is about 5x slower than this over a
    50k vocabulary.
    """
    rows, vocab = logits.shape
    blocks = jnp.pad(logits, ((0, 0), (0, -vocab % block)), constant_values=-jnp.inf).reshape(rows, -1, block)
    which = jnp.argmax(blocks.max(axis=-1), axis=-1)
    within = jnp.argmax(jnp.take_along_axis(blocks, which[:, None, None], axis=1)[:, 0], axis=-1)
    return (which * block + within).astype(jnp.int32)


def _token_logprobs(logits: jax.Array, tokens: jax.Array) -> jax.Array:
    return jnp.take_along_axis(logits, tokens[:, None], axis=-1)[:, 0] - jax.nn.logsumexp(logits, axis=-1)


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
