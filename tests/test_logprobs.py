"""Top-N logprobs of sampled tokens and prompt logprobs equal transformers' log-softmax on the same weights.

A random-weight GQA Llama saved by transformers goes through jaxinfer's safetensors import; the engine
runs four requests together (prompts prefilled over several chunks, greedy and seeded sampling) on
1x1 and on a 2x4 mesh, where the requests sit on both data shards. Every reported value is checked
against log_softmax of transformers' logits over the prompt plus the tokens the engine produced.
"""

import numpy as np
import pytest

from jaxinfer.checkpoint.load import load_model
from jaxinfer.config import ModelConfig
from jaxinfer.engine.engine import Engine, EngineConfig
from jaxinfer.engine.requests import Request, SamplingParams
from jaxinfer.sharding import make_mesh
from tests.hf_reference import hf_logits, save_random_hf_llama

CONFIG = ModelConfig(
    name="gqa",
    vocab_size=384,
    hidden_size=64,
    intermediate_size=96,
    num_layers=2,
    num_heads=8,
    num_kv_heads=2,
    head_dim=16,
    max_position_embeddings=256,
)
RTOL = 1e-4


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    path = tmp_path_factory.mktemp("gqa")
    return path, save_random_hf_llama(CONFIG, path, seed=11)


def log_softmax(logits: np.ndarray) -> np.ndarray:
    x = np.asarray(logits, np.float64)
    return x - x.max(-1, keepdims=True) - np.log(np.exp(x - x.max(-1, keepdims=True)).sum(-1, keepdims=True))


def assert_top(pairs, row: np.ndarray, n: int):
    ids = [t for t, _ in pairs]
    assert len(pairs) == n and ids == list(np.argsort(-row, kind="stable")[:n])
    np.testing.assert_allclose([lp for _, lp in pairs], row[ids], rtol=RTOL)


@pytest.mark.parametrize("mesh", ["1x1", "2x4"])
def test_logprobs_match_transformers(reference, mesh):
    path, hf = reference
    model = load_model(str(path), make_mesh(mesh), "float32")
    engine = Engine(model, None, EngineConfig(max_slots=4, max_context=96, prefill_chunk=16, page_size=8, min_bucket=8))
    engine.warmup()
    rng = np.random.default_rng(0)
    prompts = [rng.integers(0, CONFIG.vocab_size, n).tolist() for n in (40, 23, 7, 18)]
    params = [
        SamplingParams(max_tokens=6, logprobs=True, top_logprobs=5, prompt_logprobs=5, ignore_eos=True),
        SamplingParams(max_tokens=5, temperature=0.9, seed=3, top_logprobs=20, prompt_logprobs=0, ignore_eos=True),
        SamplingParams(max_tokens=4, logprobs=True, ignore_eos=True),
        SamplingParams(max_tokens=3, prompt_logprobs=20, top_logprobs=1, logprobs=True, ignore_eos=True),
    ]
    requests = [Request(f"r{i}", p, q) for i, (p, q) in enumerate(zip(prompts, params))]
    results = engine.generate(requests)
    assert engine.compilations_after_warmup == 0
    for req, res in zip(requests, results):
        p = req.params
        full = req.prompt_ids + res.token_ids
        ref = log_softmax(hf_logits(hf, np.asarray([full]))[0])  # ref[i]: the distribution of token i + 1
        n = len(req.prompt_ids)
        if p.prompt_logprobs is None:
            assert res.prompt_logprobs is None and res.prompt_top_logprobs is None
        else:
            assert res.prompt_logprobs[0] is None and res.prompt_top_logprobs[0] == []
            expected = [ref[j - 1, req.prompt_ids[j]] for j in range(1, n)]
            np.testing.assert_allclose(res.prompt_logprobs[1:], expected, rtol=RTOL)
            for j in range(1, n):
                assert_top(res.prompt_top_logprobs[j], ref[j - 1], p.prompt_logprobs)
        sampled = [ref[n - 1 + k, t] for k, t in enumerate(res.token_ids)]
        if p.logprobs:
            np.testing.assert_allclose(res.logprobs, sampled, rtol=RTOL)
        if p.top_logprobs:
            for k, pairs in enumerate(res.top_logprobs):
                assert_top(pairs, ref[n - 1 + k], p.top_logprobs)
        else:
            assert res.top_logprobs is None
        if p.temperature == 0:
            assert res.token_ids == [int(np.argmax(ref[n - 1 + k])) for k in range(len(res.token_ids))]
