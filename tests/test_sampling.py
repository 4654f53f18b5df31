"""Statistical checks of on-device sampling on a small vocabulary with fixed seeds."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxinfer.sampling import SamplingArrays, greedy_tokens, sample

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
