"""Vectorised on-device sampling, one row per sequence.

Each row carries its own parameters. First the logits are adjusted, for rows that ask for it, from
the row's `PenaltyRows` (logit bias, then the repetition, frequency and presence penalties, in
vLLM's order). temperature == 0 then means greedy on the adjusted logits; otherwise the filters
apply in the order top-k, top-p (nucleus), min-p, all on the temperature-scaled distribution. The
random draw for a row uses `fold_in(key(seed), position)`: it depends only on the request's seed
and the position of the token being sampled, never on the slot or the batch around it.

Reported logprobs (the sampled token's and the top alternatives) are those of the raw model, before
any adjustment, temperature or filter, as vLLM reports them by default.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp

from jaxinfer.quant.arrays import materialize


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
    top_logprobs: jax.Array  # i32, how many of the most likely tokens the caller wants (0 = none)
    penalized: jax.Array  # bool, adjust the logits with the row's PenaltyRows (bias and penalties)
    presence: jax.Array  # f32, subtracted from the logit of every token generated so far
    frequency: jax.Array  # f32, subtracted per time each token was generated so far
    repetition: jax.Array  # f32, > 0; 1 = off

    @classmethod
    def neutral(cls, rows: int, **values) -> SamplingArrays:
        """Numpy arrays for `rows` greedy rows with everything off, then `values` (arrays or scalars)."""
        import numpy as np

        arrays = dict(
            temperature=np.zeros(rows, np.float32),
            top_k=np.zeros(rows, np.int32),
            top_p=np.ones(rows, np.float32),
            min_p=np.zeros(rows, np.float32),
            seed=np.zeros(rows, np.uint32),
            position=np.zeros(rows, np.int32),
            logprobs=np.zeros(rows, bool),
            top_logprobs=np.zeros(rows, np.int32),
            penalized=np.zeros(rows, bool),
            presence=np.zeros(rows, np.float32),
            frequency=np.zeros(rows, np.float32),
            repetition=np.ones(rows, np.float32),
        )
        for key, value in values.items():
            arrays[key] = np.broadcast_to(np.asarray(value, arrays[key].dtype), (rows,)).copy()
        return cls(**arrays)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class PenaltyRows:
    """What the penalties of a row depend on, for its request so far; each [rows, vocab]."""

    counts: jax.Array  # i32, times each token was generated
    seen: jax.Array  # bool, the token is in the prompt (the repetition penalty covers prompt and output)
    bias: jax.Array  # f32, the request's logit_bias as a dense row


TOP_LOGPROBS = 20  # alternatives computed per position when any row asks (requests take up to this many)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Samples:
    tokens: jax.Array  # i32 [rows]
    logprobs: jax.Array  # f32 [rows]: of each sampled token under the raw model (0 unless asked)
    top_ids: jax.Array  # i32 [rows, TOP_LOGPROBS]: the most likely tokens under the raw model (0 unless asked)
    top_logprobs: jax.Array  # f32 [rows, TOP_LOGPROBS]


def sample(
    logits: jax.Array, p: SamplingArrays, penalties: PenaltyRows | Callable[[], PenaltyRows] | None = None
) -> Samples:
    """logits f32 [rows, vocab] -> the sampled tokens, their logprobs and the top alternatives.

    `penalties` are the rows' `PenaltyRows`, or a function that gathers them: it runs only when some row
    is penalized, so an unpenalized batch never copies its rows' [rows, vocab] state.
    """
    raw = logits = logits.astype(jnp.float32)
    if penalties is not None:
        gather = penalties if callable(penalties) else lambda: penalties
        logits = jax.lax.cond(jnp.any(p.penalized), lambda x: penalize(x, p, gather()), lambda x: x, logits)
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
    logprobs = jax.lax.cond(jnp.any(p.logprobs), _token_logprobs, lambda *_: jnp.zeros(tokens.shape), raw, tokens)
    top_ids, top_logprobs = jax.lax.cond(jnp.any(p.top_logprobs > 0), top_alternatives, _no_alternatives, raw)
    return Samples(tokens, logprobs, top_ids, top_logprobs)


def top_alternatives(logits: jax.Array) -> tuple[jax.Array, jax.Array]:
    """logits f32 [..., vocab] -> (ids i32 [..., TOP_LOGPROBS], their logprobs f32), most likely first."""
    short = max(TOP_LOGPROBS - logits.shape[-1], 0)  # a vocabulary under TOP_LOGPROBS: the rest are -inf
    padded = jnp.pad(logits, [(0, 0)] * (logits.ndim - 1) + [(0, short)], constant_values=-jnp.inf)
    values, ids = jax.lax.top_k(padded, TOP_LOGPROBS)
    return ids.astype(jnp.int32), values - jax.nn.logsumexp(logits, axis=-1, keepdims=True)


def _no_alternatives(logits: jax.Array) -> tuple[jax.Array, jax.Array]:
    shape = logits.shape[:-1] + (TOP_LOGPROBS,)
    return jnp.zeros(shape, jnp.int32), jnp.zeros(shape, jnp.float32)


def penalize(logits: jax.Array, p: SamplingArrays, rows: PenaltyRows) -> jax.Array:
    """vLLM's order: the bias, then the repetition penalty on prompt and generated tokens (positive logits
    divided, the others multiplied), then the frequency and presence penalties on generated tokens."""
    on = p.penalized[:, None]
    logits = logits + jnp.where(on, rows.bias, 0.0)
    generated = rows.counts > 0
    repetition = jnp.where(on & (generated | rows.seen), p.repetition[:, None], 1.0)
    logits = jnp.where(logits > 0, logits / repetition, logits * repetition)
    penalty = p.frequency[:, None] * rows.counts + p.presence[:, None] * generated
    return logits - jnp.where(on, penalty, 0.0)


def count_tokens(counts: jax.Array, rows: jax.Array, tokens: jax.Array, penalized: jax.Array) -> jax.Array:
    """counts i32 [slots, vocab] after `tokens` i32 [n] were generated by rows `rows` i32 [n] (penalized
    ones only, bool [n]: the others' counts are never read)."""
    return counts.at[rows, tokens].add(penalized.astype(jnp.int32))


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
    logit is >= a per-row cutoff logit. Skipped entirely when no row asks for a filter.
    """
    active = jnp.any((p.top_k > 0) | (p.top_p < 1.0) | (p.min_p > 0.0))
    return jax.lax.cond(active, _apply_filters, lambda s, _: s, scaled, p)


def _apply_filters(scaled: jax.Array, p: SamplingArrays) -> jax.Array:
    """scaled f32 [rows, vocab] -> the same with the tokens below each row's cutoff logit at -inf.

    The cutoff is the largest of three, each the logit of the last token a filter keeps in the order
    of a descending sort (ties at the cutoff all stay), found without sorting:
      - top-k: the k-th largest logit, the smallest t with fewer than k logits > t;
      - top-p: the smallest t whose probability mass strictly above it is < top_p, the probabilities
        those of the softmax over the top k (of k tied copies of the k-th logit, k are counted);
      - min-p: the smallest logit whose probability is >= min_p times the largest.
    The first two are bisections over the float32 values (32 masked counts or sums over the row),
    each row on its own. In exact arithmetic this is what a sort and a cumulative sum give; in float32
    the sums run in another order, so a token whose mass above it is within rounding of top_p may
    fall on the other side than under a sort. top_p >= 1 is off (a cumulative sum could otherwise
    round to 1.0 before the tail and drop tokens of probability ~0).
    """
    vocab = scaled.shape[-1]
    top = jnp.max(scaled, axis=-1)  # [rows]
    bottom = jnp.min(scaled, axis=-1)
    k = jnp.where(p.top_k > 0, jnp.minimum(p.top_k, vocab), vocab)
    use_k, use_p = k < vocab, p.top_p < 1.0

    # Branches only skip searches no row needs: a row without the filter gets `bottom` either way.
    def count_above(t):
        return jnp.sum(scaled > t[:, None], axis=-1) < k

    kth = jax.lax.cond(jnp.any(use_k), lambda: _smallest_passing(count_above, bottom, top), lambda: bottom)
    kth = jnp.where(use_k, kth, bottom)
    exps = jnp.exp(scaled - top[:, None])  # as jax.nn.softmax: -inf entries give 0
    above = scaled > kth[:, None]
    total = jnp.sum(jnp.where(above, exps, 0.0), axis=-1) + (k - jnp.sum(above, axis=-1)) * jnp.exp(kth - top)
    probs = exps / total[:, None]

    def mass_above(t):
        return jnp.sum(jnp.where(scaled > t[:, None], probs, 0.0), axis=-1) < p.top_p

    nucleus = jax.lax.cond(jnp.any(use_p), lambda: _smallest_passing(mass_above, bottom, top), lambda: bottom)
    nucleus = jnp.where(use_p, nucleus, bottom)
    likely = probs >= (p.min_p * (1.0 / total))[:, None]  # the best token's probability is exp(0) / total
    least_likely = jnp.min(jnp.where(likely, scaled, jnp.inf), axis=-1)
    cutoff = jnp.minimum(jnp.maximum(jnp.maximum(kth, nucleus), least_likely), top)
    return jnp.where(scaled >= cutoff[:, None], scaled, -jnp.inf)


def _smallest_passing(test, low: jax.Array, high: jax.Array) -> jax.Array:
    """The smallest float32 t in [low, high] with test(t) -> bool [rows], per row; `high` where none passes.

    `test` must be monotone (false, then true, as t grows). A bisection over the float32 values in
    their order, as unsigned integers: 32 halvings cover every float.
    """

    def step(_, bounds):
        lo, hi = bounds
        mid = (lo >> 1) + (hi >> 1) + (lo & hi & 1)  # floor((lo + hi) / 2) without overflow
        ok = test(_from_ordered(mid))
        return jnp.where(ok, lo, mid + 1), jnp.where(ok, mid, hi)

    _, hi = jax.lax.fori_loop(0, 32, step, (_ordered(low), _ordered(high)))
    return _from_ordered(hi)


def _ordered(x: jax.Array) -> jax.Array:
    """float32 -> uint32 in the same order (NaN aside; -0.0 just below +0.0)."""
    bits = jax.lax.bitcast_convert_type(x, jnp.uint32)
    return jnp.where(bits >> 31 == 1, ~bits, bits | jnp.uint32(0x80000000))


def _from_ordered(key: jax.Array) -> jax.Array:
    bits = jnp.where(key >> 31 == 1, key & jnp.uint32(0x7FFFFFFF), ~key)
    return jax.lax.bitcast_convert_type(bits, jnp.float32)


PROMPT_LOGPROB_BLOCK = 128  # token positions projected to the vocabulary at once (bounds the logits' memory)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class PromptLogprobs:
    """Per token position: the log-probability of the next token (0 where no target), and the top alternatives."""

    logprobs: jax.Array  # f32 [B, T]
    top_ids: jax.Array  # i32 [B, T, TOP_LOGPROBS]
    top_logprobs: jax.Array  # f32 [B, T, TOP_LOGPROBS]


def prompt_logprobs(hidden, head, targets, vocab: int) -> PromptLogprobs:
    """hidden [B, T, E] (final-normed), head [E, V], targets i32 [B, T]: the prompt's log-likelihoods, in
    blocks of PROMPT_LOGPROB_BLOCK positions; skipped (zeros) when no target is set."""
    b, t, _ = hidden.shape
    size = min(PROMPT_LOGPROB_BLOCK, t)
    blocks = -(-t // size)
    pad = blocks * size - t

    def block(args, dense):
        h, target = args  # [B, size, E], [B, size]
        logits = jnp.einsum("bte,ev->btv", h, dense, preferred_element_type=jnp.float32)[..., :vocab]
        picked = jnp.take_along_axis(logits, jnp.maximum(target, 0)[..., None], axis=-1)[..., 0]
        ids, top = top_alternatives(logits)
        lp = jnp.where(target >= 0, picked - jax.nn.logsumexp(logits, axis=-1), 0.0)
        return lp, ids, top

    def compute(hidden, targets):
        dense = materialize(head, hidden.dtype)  # a quantized head is dequantized only when logprobs are asked
        h = jnp.pad(hidden, ((0, 0), (0, pad), (0, 0))).reshape(b, blocks, size, -1).swapaxes(0, 1)
        tg = jnp.pad(targets, ((0, 0), (0, pad)), constant_values=-1).reshape(b, blocks, size).swapaxes(0, 1)
        lp, ids, top = jax.lax.map(lambda args: block(args, dense), (h, tg))  # [blocks, B, size, ...]
        merge = lambda a: a.swapaxes(0, 1).reshape((b, blocks * size) + a.shape[3:])[:, :t]
        return merge(lp), merge(ids), merge(top)

    def skip(hidden, targets):
        return (
            jnp.zeros((b, t), jnp.float32),
            jnp.zeros((b, t, TOP_LOGPROBS), jnp.int32),
            jnp.zeros((b, t, TOP_LOGPROBS), jnp.float32),
        )

    return PromptLogprobs(*jax.lax.cond(jnp.any(targets >= 0), compute, skip, hidden, targets))
