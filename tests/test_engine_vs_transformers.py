"""Greedy generations of the engine equal transformers' `generate(do_sample=False)` token for token.

SmolLM2-135M-Instruct in float32 from the same GGUF file on both sides. Eight prompts of 1 to 300
tokens run together through 4 slots, so slots are refilled as requests finish at different steps,
and prompts longer than the 64-token prefill chunk are prefilled over several steps.
"""

import pytest

from jaxinfer.checkpoint.load import load_model
from jaxinfer.engine.engine import Engine, EngineConfig
from jaxinfer.engine.requests import Request, SamplingParams
from jaxinfer.sharding import make_mesh
from jaxinfer.tokenizer import load_tokenizer
from tests.test_reference_models import smollm2_gguf

PASSAGE = (
    "The history of astronomy is long and rich. Ancient peoples watched the sky to keep time, to "
    "navigate and to tell stories. The Babylonians recorded the motions of planets on clay tablets, "
    "and Greek thinkers such as Aristarchus and Ptolemy built models of the heavens. "
) * 8
LENGTHS = [1, 5, 17, 40, 80, 130, 210, 300]
NEW_TOKENS = [6, 14, 9, 12, 7, 10, 5, 8]


@pytest.fixture(scope="module")
def setup():
    import torch
    import transformers

    path = smollm2_gguf()
    tok = load_tokenizer(path)
    ids = tok.encode(PASSAGE, add_bos=False)
    prompts = [ids[:n] for n in LENGTHS]
    import os

    hf = transformers.AutoModelForCausalLM.from_pretrained(
        os.path.dirname(path), gguf_file=os.path.basename(path), dtype=torch.float32
    ).eval()
    expected = []
    with torch.no_grad():
        for prompt, n in zip(prompts, NEW_TOKENS):
            out = hf.generate(
                torch.tensor([prompt]),
                max_new_tokens=n,
                do_sample=False,
                eos_token_id=None,
                pad_token_id=0,
                attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
            )
            expected.append(out[0, len(prompt) :].tolist())
    return path, tok, prompts, expected


@pytest.mark.slow
# both layer layouts against transformers: the CPU default (unrolled) on 1x1, the TPU/GPU one (scanned)
# on 2x4 (tests/test_engine.py checks the two layouts agree on 2x4; one unrolled 30-layer compile is enough)
@pytest.mark.parametrize("mesh,layer_loop", [("1x1", "auto"), ("2x4", "scan")])
def test_engine_greedy_equals_transformers_generate(setup, mesh, layer_loop):
    path, tok, prompts, expected = setup
    model = load_model(path, make_mesh(mesh), "float32", layer_loop=layer_loop)
    engine = Engine(model, tok, EngineConfig(max_slots=4, max_context=512, prefill_chunk=32, layer_loop=layer_loop))
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
