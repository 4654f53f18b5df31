"""The full model with `--attention pallas` (Pallas ragged paged attention, TPU interpret mode on CPU)
generates the same greedy tokens as with `--attention xla`."""

import pytest

from jaxinfer.checkpoint.load import load_model
from jaxinfer.engine.engine import Engine, EngineConfig
from jaxinfer.engine.requests import Request, SamplingParams
from jaxinfer.sharding import make_mesh
from jaxinfer.tokenizer import load_tokenizer


def generate(model, kind, prompts, max_tokens):
    engine = Engine(model, None, EngineConfig(max_slots=2, max_context=64, prefill_chunk=16, attention=kind))
    engine.warmup()
    reqs = [Request(str(i), p, SamplingParams(max_tokens=max_tokens, ignore_eos=True)) for i, p in enumerate(prompts)]
    return [r.token_ids for r in engine.generate(reqs)]


@pytest.mark.slow
@pytest.mark.parametrize("mesh,max_tokens", [("1x1", 16), ("2x4", 4)])
def test_stories260k_pallas_equals_xla(data_dir, mesh, max_tokens):
    tok = load_tokenizer(data_dir / "stories260K" / "tok512.bin")
    model = load_model(str(data_dir / "stories260K" / "stories260K.bin"), make_mesh(mesh))
    prompts = [[tok.bos_id] + tok.encode(t, add_bos=False) for t in ("Once upon a time", "The cat sat on the")]
    assert generate(model, "pallas", prompts, max_tokens) == generate(model, "xla", prompts, max_tokens)


@pytest.mark.slow
@pytest.mark.parametrize("mesh", ["1x1", "2x4"])
def test_tiny_gqa_pallas_equals_xla(mesh):
    model = load_model("tiny", make_mesh(mesh), seed=3)  # random weights, 4 query / 2 KV heads
    prompts = [[5, 17, 99, 3, 42, 8, 200, 31, 64, 77, 12, 150, 7, 9, 250, 1, 2, 3, 4, 5], [11, 12]]
    assert generate(model, "pallas", prompts, 4) == generate(model, "xla", prompts, 4)
