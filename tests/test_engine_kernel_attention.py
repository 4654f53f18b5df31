"""The full model with `--attention pallas` (Pallas ragged paged attention, TPU interpret mode on CPU)
generates the same greedy tokens as with `--attention xla`.

The xla engine runs first with every bucket compiled; the pallas engine then compiles only the buckets
the xla engine's steps used (a step in TPU interpret mode costs seconds to compile) and must run the
same steps in them: the scheduler's step budget is the largest ready bucket, which is the largest
bucket these steps needed, so it plans the same steps."""

import pytest

from jaxinfer.checkpoint.load import load_model
from jaxinfer.engine.engine import Engine, EngineConfig
from jaxinfer.engine.requests import Request, SamplingParams
from jaxinfer.sharding import make_mesh
from jaxinfer.tokenizer import load_tokenizer


def generate(model, kind, prompts, max_tokens, buckets=None):
    """(token ids per prompt, steps by bucket); `buckets`: compile only these (default: warm up all)."""
    engine = Engine(model, None, EngineConfig(max_slots=2, max_context=64, prefill_chunk=16, attention=kind))
    if buckets is None:
        engine.warmup()
    else:
        engine.install(engine.compile(sorted(buckets)))
    reqs = [Request(str(i), p, SamplingParams(max_tokens=max_tokens, ignore_eos=True)) for i, p in enumerate(prompts)]
    tokens = [r.token_ids for r in engine.generate(reqs)]
    return tokens, dict(engine.status().steps_by_bucket)


def assert_pallas_equals_xla(model, prompts, max_tokens):
    xla_tokens, xla_steps = generate(model, "xla", prompts, max_tokens)
    pallas_tokens, pallas_steps = generate(model, "pallas", prompts, max_tokens, buckets=xla_steps)
    assert pallas_steps == xla_steps  # the same steps, padded to the same buckets
    assert pallas_tokens == xla_tokens


@pytest.mark.slow
@pytest.mark.parametrize("mesh,max_tokens", [("1x1", 16), ("2x4", 4)])
def test_stories260k_pallas_equals_xla(data_dir, mesh, max_tokens):
    tok = load_tokenizer(data_dir / "stories260K" / "tok512.bin")
    model = load_model(str(data_dir / "stories260K" / "stories260K.bin"), make_mesh(mesh))
    prompts = [[tok.bos_id] + tok.encode(t, add_bos=False) for t in ("Once upon a time", "The cat sat on the")]
    assert_pallas_equals_xla(model, prompts, max_tokens)


@pytest.mark.slow
@pytest.mark.parametrize("mesh", ["1x1", "2x4"])
def test_tiny_gqa_pallas_equals_xla(mesh):
    model = load_model("tiny", make_mesh(mesh), seed=3)  # random weights, 4 query / 2 KV heads
    prompts = [[5, 17, 99, 3, 42, 8, 200, 31, 64, 77, 12, 150, 7, 9, 250, 1, 2, 3, 4, 5], [11, 12]]
    assert_pallas_equals_xla(model, prompts, 4)
