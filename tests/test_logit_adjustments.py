"""Presence, frequency and repetition penalties and logit_bias, against a numpy reference.

The reference adjusts the raw logits as vLLM documents it: the bias is added, then prompt and
generated tokens get the repetition penalty (positive logits divided, the others multiplied), then
generated tokens lose `frequency * count + presence`. Unit checks compare the adjusted logits and the
sampled distribution; the engine checks greedy decoding on stories260K step by step against the
numpy reference over the dense forward, with slots reused and requests preempted.
"""

import collections

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxinfer.checkpoint.load import load_model
from jaxinfer.engine.engine import Engine, EngineConfig
from jaxinfer.engine.requests import Request, SamplingParams
from jaxinfer.sampling import PenaltyRows, SamplingArrays, penalize, sample
from jaxinfer.sharding import make_mesh
from jaxinfer.tokenizer import load_tokenizer
from tests.dense_greedy import fitting_window
from tests.test_sampling import chi_square_p


def reference_adjust(logits, params: SamplingParams, prompt, generated) -> np.ndarray:
    out = np.asarray(logits, np.float64).copy()
    for token, bias in params.logit_bias:
        out[token] += bias
    counts = collections.Counter(generated)
    for token in set(prompt) | set(counts):
        r = params.repetition_penalty
        out[token] = out[token] / r if out[token] > 0 else out[token] * r
    for token, n in counts.items():
        out[token] -= params.frequency_penalty * n + params.presence_penalty
    return out


def rows_for(vocab, params, prompt, generated) -> PenaltyRows:
    from jaxinfer.engine.sampler_state import penalty_rows

    return penalty_rows(params, prompt, generated, vocab)


CASES = [
    SamplingParams(presence_penalty=1.5),
    SamplingParams(frequency_penalty=-0.8),
    SamplingParams(repetition_penalty=1.7),
    SamplingParams(repetition_penalty=0.6),
    SamplingParams(logit_bias=((3, 4.0), (7, -100.0))),
    SamplingParams(presence_penalty=-0.5, frequency_penalty=0.9, repetition_penalty=1.3, logit_bias=((1, 2.5),)),
]


def arrays(params: SamplingParams, rows: int, **extra) -> SamplingArrays:
    return SamplingArrays.neutral(
        rows,
        penalized=params.penalized,
        presence=params.presence_penalty,
        frequency=params.frequency_penalty,
        repetition=params.repetition_penalty,
        **extra,
    )


@pytest.mark.parametrize("params", CASES)
def test_adjusted_logits_equal_numpy(params):
    vocab = 16
    rng = np.random.default_rng(0)
    logits = rng.standard_normal(vocab).astype(np.float32) * 3  # both signs, for the repetition penalty
    prompt, generated = [2, 3, 5], [3, 9, 9, 9, 11]
    rows = rows_for(vocab, params, prompt, generated)
    got = penalize(jnp.asarray(logits[None]), arrays(params, 1), jax.tree.map(lambda a: a[None], rows))
    np.testing.assert_allclose(np.asarray(got[0]), reference_adjust(logits, params, prompt, generated), rtol=1e-6)
    # a row that does not ask is left alone, even with rows holding another request's counts
    untouched = penalize(jnp.asarray(logits[None]), SamplingArrays.neutral(1), jax.tree.map(lambda a: a[None], rows))
    np.testing.assert_array_equal(np.asarray(untouched[0]), logits)


def test_sampled_distribution_follows_the_adjusted_logits():
    vocab, n = 8, 6000
    params = CASES[-1]
    logits = np.log(np.array([30, 20, 15, 10, 8, 6, 4, 7], np.float64) / 100).astype(np.float32)
    prompt, generated = [0, 4], [1, 1, 2]
    rows = jax.tree.map(lambda a: np.broadcast_to(a, (n,) + a.shape), rows_for(vocab, params, prompt, generated))
    p = arrays(params, n, temperature=1.0, seed=3, position=np.arange(n))
    tokens = np.asarray(jax.jit(sample)(jnp.tile(logits, (n, 1)), p, rows).tokens)
    adjusted = reference_adjust(logits, params, prompt, generated)
    probs = np.exp(adjusted - adjusted.max())
    assert chi_square_p(np.bincount(tokens, minlength=vocab), probs) > 1e-3
    # greedy follows the adjusted argmax, which the bias moved off the raw one
    greedy = sample(jnp.tile(logits, (2, 1)), arrays(params, 2), jax.tree.map(lambda a: a[:2], rows)).tokens
    assert int(greedy[0]) == int(np.argmax(adjusted)) != int(np.argmax(logits))


def penalized_greedy_dense(model, prompt, params: SamplingParams) -> list[int]:
    window = fitting_window([len(prompt) + params.max_tokens])
    ids, out = list(prompt), []
    for _ in range(params.max_tokens):
        tokens = np.zeros((1, window), np.int32)
        positions = np.full((1, window), -1, np.int32)
        tokens[0, : len(ids)] = ids
        positions[0, : len(ids)] = np.arange(len(ids))
        logits = model.logits(tokens, positions)[0, len(ids) - 1]
        nxt = int(np.argmax(reference_adjust(logits, params, prompt, out)))
        out.append(nxt)
        ids.append(nxt)
    return out


def test_engine_penalties_equal_the_numpy_reference(data_dir):
    """Six penalized requests and two plain ones through 2 slots with few pages: slots are reused by
    requests with and without penalties, and requests are preempted and readmitted mid-generation."""
    tok = load_tokenizer(data_dir / "stories260K" / "tok512.bin")
    model = load_model(str(data_dir / "stories260K" / "stories260K.bin"), make_mesh("1x1"))
    engine = Engine(
        model, tok, EngineConfig(max_slots=2, max_context=48, prefill_chunk=16, page_size=8, kv_pages=7, min_bucket=8)
    )
    engine.warmup()
    prompts = ["The cat sat on the mat", "Lily and Ben", "Once upon a time", "A big dog"]
    plain = SamplingParams(max_tokens=24, ignore_eos=True)
    strong = [
        dict(presence_penalty=2.0),
        dict(frequency_penalty=2.0),
        dict(repetition_penalty=3.0),
        dict(frequency_penalty=-2.0, repetition_penalty=0.5),
        dict(presence_penalty=1.0, frequency_penalty=1.0, repetition_penalty=1.5, logit_bias=((400, 3.0),)),
        dict(logit_bias=((tok.encode(" dog", add_bos=False)[0], 100.0),)),
    ]
    params = [SamplingParams(max_tokens=24, ignore_eos=True, **kw) for kw in strong[:5]]
    params += [plain, SamplingParams(max_tokens=24, ignore_eos=True, **strong[5]), plain]
    requests = [
        Request(f"r{i}", [tok.bos_id] + tok.encode(prompts[i % 4], add_bos=False), p) for i, p in enumerate(params)
    ]
    results = engine.generate(requests)
    assert engine.status().preemptions > 0 and engine.compilations_after_warmup == 0
    changed = 0
    for req, res in zip(requests, results):
        assert res.token_ids == penalized_greedy_dense(model, req.prompt_ids, req.params), req.id
        if req.params.penalized:
            changed += res.token_ids != penalized_greedy_dense(model, req.prompt_ids, plain)
    assert changed == 6  # the penalties did change what greedy decoding picks
