"""Statistical checks of on-device sampling on a small vocabulary with fixed seeds."""

import dataclasses
import operator

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxinfer.sampling import SamplingArrays, _filter, greedy_tokens, sample

VOCAB = 12
LOGITS = np.log(np.array([30, 20, 15, 10, 8, 6, 4, 3, 2, 1, 0.6, 0.4], np.float64) / 100.0).astype(np.float32)
DRAWS = 6000


def draw(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, seed=7):
    """DRAWS samples: one row per draw, positions 0..DRAWS-1 give independent streams."""
    n = DRAWS
    p = SamplingArrays.neutral(
        n,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        min_p=min_p,
        seed=seed,
        position=np.arange(n),
        logprobs=True,
    )
    out = jax.jit(sample)(jnp.tile(LOGITS, (n, 1)), p)
    return np.asarray(out.tokens), np.asarray(out.logprobs)


def chi_square_p(counts, probs):
    from scipy.stats import chisquare

    probs = np.asarray(probs, np.float64) / np.sum(probs, dtype=np.float64)
    return chisquare(counts, probs * counts.sum()).pvalue


def test_greedy_is_argmax():
    tokens, logprobs = draw(temperature=0.0)
    assert (tokens == 0).all()
    np.testing.assert_allclose(logprobs, LOGITS[0] - np.log(np.exp(LOGITS).sum()), rtol=1e-5)


@pytest.mark.parametrize("temperature", [1.0, 0.7, 1.5])
def test_temperature_matches_softmax(temperature):
    tokens, _ = draw(temperature=temperature)
    probs = np.exp(LOGITS / temperature) / np.exp(LOGITS / temperature).sum()
    counts = np.bincount(tokens, minlength=VOCAB)
    assert chi_square_p(counts, probs) > 1e-3


def test_top_k_never_leaves_top_k():
    tokens, _ = draw(top_k=3)
    assert set(np.unique(tokens)) <= {0, 1, 2}
    probs = np.exp(LOGITS[:3]) / np.exp(LOGITS[:3]).sum()  # renormalised over the kept set
    assert chi_square_p(np.bincount(tokens, minlength=3)[:3], probs) > 1e-3


def test_top_p_never_leaves_nucleus():
    tokens, _ = draw(top_p=0.6)  # cumulative 0.30, 0.50, 0.65 -> nucleus is tokens {0, 1, 2}
    assert set(np.unique(tokens)) == {0, 1, 2}


def test_min_p_keeps_tokens_above_fraction_of_best():
    tokens, _ = draw(min_p=0.25)  # best 0.30 -> keep p >= 0.075: tokens 0..4
    assert set(np.unique(tokens)) == {0, 1, 2, 3, 4}


def test_stream_depends_on_seed_and_position_only():
    a, _ = draw(seed=1)
    b, _ = draw(seed=1)
    c, _ = draw(seed=2)
    assert (a == b).all() and (a != c).any()
    # the same (seed, position) in a different row of a different batch gives the same token
    p = SamplingArrays.neutral(2, temperature=1.0, seed=1, position=[99, 5])
    tokens = sample(jnp.tile(LOGITS, (2, 1)), p).tokens
    assert int(tokens[0]) == a[99] and int(tokens[1]) == a[5]


@pytest.mark.parametrize("vocab", [12, 128, 300, 49152])
def test_greedy_tokens_equals_argmax(vocab):
    """The blocked argmax picks what np.argmax picks: ties to the first index, -inf rows, ragged vocab."""
    rng = np.random.default_rng(vocab)
    logits = rng.standard_normal((6, vocab)).astype(np.float32)
    logits[1, [vocab // 3, vocab - 1]] = 50.0  # tie across blocks: the first wins
    logits[2] = -np.inf  # nothing finite
    logits[3, vocab - 1] = 40.0  # the maximum in the last, partial block
    logits[4, [vocab // 2, vocab - 2]] = 45.0  # tie within the last blocks
    logits[5] = np.round(logits[5])  # many ties
    got = np.asarray(jax.jit(greedy_tokens)(jnp.asarray(logits)))
    np.testing.assert_array_equal(got, np.argmax(logits, axis=-1))


def test_logprobs_only_when_asked():
    n = 4
    p = SamplingArrays.neutral(n)
    none = sample(jnp.tile(LOGITS, (n, 1)), p)
    assert (np.asarray(none.logprobs) == 0).all() and (np.asarray(none.top_logprobs) == 0).all()
    some = sample(jnp.tile(LOGITS, (n, 1)), dataclasses.replace(p, logprobs=np.array([False, True, False, False])))
    np.testing.assert_allclose(np.asarray(some.logprobs), LOGITS[0] - np.log(np.exp(LOGITS).sum()), rtol=1e-5)


def reference_filter(row, top_k, top_p, min_p, slack=0.0):
    """A float64 sort of one row: the tokens kept by top-k, then top-p and min-p over the top-k softmax.

    `slack` > 0 keeps also the tokens within `slack` of a top-p / min-p boundary, < 0 drops them:
    float32 sums in another order may put such a token on either side.
    """
    order = np.sort(row.astype(np.float64))[::-1]
    k = min(top_k, row.size) if top_k > 0 else row.size
    probs = np.exp(order - order[0])
    probs[k:] = 0.0
    probs /= probs.sum()
    before = np.cumsum(probs) - probs
    keep = np.arange(row.size) < k
    if top_p < 1.0:
        keep &= before < top_p + slack
    keep &= probs >= min_p * probs[0] * (1.0 - slack)
    count = max(int(keep.sum()), 1)
    return (row >= order[count - 1]) & np.isfinite(row)  # a kept -inf is still -inf


def random_rows(rng, rows, vocab):
    """Random logits with ties, -inf entries and various spreads, and random filter settings."""
    logits = rng.standard_normal((rows, vocab)) * rng.choice([0.5, 1.0, 3.0, 10.0], (rows, 1))
    logits[::4] = np.round(logits[::4])  # many ties
    logits[1::4, rng.integers(0, vocab, vocab // 3)] = -np.inf
    params = SamplingArrays.neutral(
        rows,
        top_k=rng.choice([0, 0, 1, 2, 5, 50, vocab // 2, vocab, vocab + 3], rows),
        top_p=rng.choice([1.0, 1.0, 0.01, 0.5, 0.9, 0.95, 0.999], rows),
        min_p=rng.choice([0.0, 0.0, 0.01, 0.1, 0.5], rows),
    )
    return logits.astype(np.float32), params


@pytest.mark.parametrize("vocab", [7, 1000, 49152])
def test_filters_keep_what_a_sort_keeps(vocab):
    """The kept set is the sorted reference's, but for tokens within float32 rounding of a boundary."""
    rng = np.random.default_rng(vocab)
    rows = 256 if vocab < 49152 else 48
    logits, p = random_rows(rng, rows, vocab)
    kept = np.isfinite(np.asarray(jax.jit(_filter)(jnp.asarray(logits), p)))
    exact = 0
    for i in range(rows):
        args = logits[i], int(p.top_k[i]), float(p.top_p[i]), float(p.min_p[i])
        surely, maybe = reference_filter(*args, slack=-1e-6), reference_filter(*args, slack=1e-6)
        assert (kept[i] >= surely).all() and (kept[i] <= maybe).all(), f"row {i}: {args[1:]}"
        exact += (kept[i] == reference_filter(*args)).all()
    assert exact >= 0.95 * rows  # boundary cases are rare


def test_filters_are_batch_invariant():
    """A row's output is bit-identical alone and among 63 other rows, whatever those ask for; a row
    asking for no filter keeps every token even when others filter."""
    rng = np.random.default_rng(0)
    logits, p = random_rows(rng, 64, 49152)
    p = dataclasses.replace(p, top_k=p.top_k.copy(), top_p=p.top_p.copy(), min_p=p.min_p.copy())
    p.top_k[5], p.top_p[5], p.min_p[5] = 0, 1.0, 0.0  # no filter
    filtered = jax.jit(_filter)
    batch = np.asarray(filtered(jnp.asarray(logits), p))
    np.testing.assert_array_equal(batch[5], logits[5])
    for i in range(0, 64, 3):
        alone = filtered(jnp.asarray(logits[i : i + 1]), jax.tree.map(operator.itemgetter(slice(i, i + 1)), p))
        np.testing.assert_array_equal(np.asarray(alone)[0], batch[i])
