"""The step's vocabulary head and sampler, run only for the rows that sample.

A step of T tokens has at most R = min(T, S) slots that sample (`StepInputs.logit_rows`), so a
one-token step of a 32-slot engine projects and samples one row, not 32. Within that bound a step
often samples fewer: one prompt's 32-token prefill chunk samples one row, and none before its last
chunk. The head is a small model's largest matmul (SmolLM2: 49k x 576), so `step_logits` picks, on
device, the smallest of a few row counts (`row_tiers`: none, one, all R) that holds every shard's
sampling rows, and projects only that many: a `lax.switch`, so one executable serves every count
and nothing recompiles. A verify step's E extra rows always run. This holds on meshes with one data
shard: with several, every device would first have to agree on the count, a collective over the data
shards that depends only on the inputs, so XLA may run it before the layers' own collectives on some
devices and after on others. A 2x4 CPU mesh running the Pallas kernel in interpret mode deadlocked
(an optimization barrier meant to order it after the layers was gone from XLA:CPU's optimized HLO),
so a step there projects all R rows; its sampler still runs over R rows, not one per slot.

The sampler then runs over the R rows (rows past the sampling ones hold zeros and are never read).
Giving it branches of its own too was measured: each copy of the sampler adds about 1.5 s of
compilation per bucket (warm-up of a 32-slot SmolLM2 engine went from 63-69 s to 78-89 s), and
sampling 32 rows instead of one costs a few milliseconds in a prefill step of over 100.

Samples come back in rows by slot (unsampled slots get row 0's, which nothing reads), then the E
extra rows: what `verify.accepted_counts` and the host's readback index.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from jaxinfer.engine.verify import extra_row_sampling
from jaxinfer.sampling import PenaltyRows, Samples, count_tokens, sample


def row_tiers(rows: int) -> tuple[int, ...]:
    """The row counts a step of `rows` logit rows compiles head branches for: none, one, all."""
    return tuple(sorted({0, min(1, rows), rows}))


def step_logits(x, project, inputs, vocab: int):
    """x [D, R + E, E_dim] the final-normed rows of `inputs.logit_rows` then of the extra rows, `project`
    rows -> float32 logits [.., vocab] -> logits [D, R + E, vocab], the rows past the step's sampling
    rows zero."""
    d, r = inputs.logit_rows.shape
    tiers = row_tiers(r) if d == 1 else (r,)

    def branch(t: int):
        def run(x):
            rows = jnp.concatenate([x[:, :t], x[:, r:]], axis=1)  # [D, t + E, E_dim]
            if not rows.shape[1]:
                return jnp.zeros(x.shape[:2] + (vocab,), jnp.float32)
            logits = project(rows)
            skipped = jnp.zeros((d, r - t, vocab), jnp.float32)
            return jnp.concatenate([logits[:, :t], skipped, logits[:, t:]], axis=1)

        return run

    if len(tiers) == 1:
        return branch(r)(x)
    sampling_rows = jnp.sum(inputs.logit_slot[0] >= 0)  # the one data shard (see the module docstring)
    index = jnp.searchsorted(jnp.asarray(tiers, jnp.int32), sampling_rows)  # the first tier >= it
    return jax.lax.switch(index, [branch(t) for t in tiers], x)


def sample_step_rows(logits, inputs, penalties: PenaltyRows) -> tuple[Samples, PenaltyRows]:
    """logits [D, R + E, V] (`step_logits`) -> (Samples [D, S + E, ...], the penalty rows after counting
    the sampled tokens of penalized slots)."""
    r, slot = inputs.logit_rows.shape[1], inputs.logit_slot
    rows = jax.tree.map(lambda a: take_rows(a, slot), inputs.sampling)  # each row's slot's arrays
    rows = dataclasses.replace(rows, penalized=rows.penalized & (slot >= 0))  # rows past the last: none
    gather = lambda: jax.tree.map(lambda a: take_rows(a, slot), penalties)  # only if some row is penalized
    own = _sample(logits[:, :r], rows, gather)
    counts = jax.vmap(count_tokens)(penalties.counts, jnp.maximum(slot, 0), own.tokens, rows.penalized)
    samples = jax.tree.map(lambda a: take_rows(a, inputs.logit_map), own)  # [D, S, ...]
    if inputs.extra_index.shape[1]:  # the verify variant
        extra_rows = jax.tree.map(lambda a: take_rows(a, inputs.extra_slot), inputs.sampling)
        extra = extra_row_sampling(extra_rows, inputs.extra_offset)
        more = _sample(logits[:, r:], extra)
        samples = jax.tree.map(lambda a, b: jnp.concatenate([a, b], axis=1), samples, more)
    return samples, dataclasses.replace(penalties, counts=counts)


def _sample(logits, sampling, penalties=None) -> Samples:
    """logits [D, N, V], sampling arrays [D, N] -> Samples [D, N, ...]; `penalties`, given, is a function
    giving the rows' penalty rows [D, N, V] (called only when some row is penalized)."""
    d, n, v = logits.shape
    flat = lambda a: a.reshape((d * n,) + a.shape[2:])
    gather = None if penalties is None else lambda: jax.tree.map(flat, penalties())
    samples = sample(logits.reshape(d * n, v), jax.tree.map(flat, sampling), gather)
    return jax.tree.map(lambda a: a.reshape((d, n) + a.shape[1:]), samples)


def take_rows(a, index):
    """a [D, N, ...] -> a [D, M, ...] at index i32 [D, M] (negative: row 0) along the rows, per data shard."""
    index = jnp.maximum(index, 0).reshape(index.shape + (1,) * (a.ndim - 2))
    return jnp.take_along_axis(a, index, axis=1)
