"""The full model with `--attention pallas` (Pallas ragged paged attention, TPU interpret mode on CPU)
generates the same greedy tokens as with `--attention xla`.

Both engines compile the same few buckets and nothing else (a step in TPU interpret mode costs seconds
to compile, and a bucket no step uses proves nothing): one that holds a step of only decodes (at most
one token per slot of a data shard, where the kernel picks its decode block sizes) and one that holds
the prompt chunks (its prefill block sizes). The scheduler's step budget is the largest ready bucket,
so both engines plan the same steps, padded to the same buckets; the test checks that they did and
that every compiled bucket ran."""

import pytest

from jaxinfer.checkpoint.load import load_model
from jaxinfer.engine.engine import Engine, EngineConfig
from jaxinfer.engine.requests import Request, SamplingParams
from jaxinfer.sharding import make_mesh
from jaxinfer.tokenizer import load_tokenizer


def generate(model, kind, prompts, max_tokens, buckets):
    """(token ids per prompt, steps by bucket), with only `buckets` compiled."""
    engine = Engine(model, None, EngineConfig(max_slots=2, max_context=64, prefill_chunk=16, attention=kind))
    engine.install(engine.compile(engine.keys_for(buckets)))
    reqs = [Request(str(i), p, SamplingParams(max_tokens=max_tokens, ignore_eos=True)) for i, p in enumerate(prompts)]
    tokens = [r.token_ids for r in engine.generate(reqs)]
    return tokens, dict(engine.status().steps_by_bucket)


def assert_pallas_equals_xla(model, prompts, max_tokens, buckets):
    xla_tokens, xla_steps = generate(model, "xla", prompts, max_tokens, buckets)
    pallas_tokens, pallas_steps = generate(model, "pallas", prompts, max_tokens, buckets)
    assert set(xla_steps) == set(buckets)  # each compiled bucket ran
    assert pallas_steps == xla_steps  # the same steps, padded to the same buckets
    assert pallas_tokens == xla_tokens


# buckets: the decode steps' (slots per data shard: 2 on 1x1, 1 on 2x4), then the prompt chunks'
@pytest.mark.slow
@pytest.mark.parametrize("mesh,max_tokens,buckets", [("1x1", 16, (2, 16)), ("2x4", 4, (1, 8))])
def test_stories260k_pallas_equals_xla(data_dir, mesh, max_tokens, buckets):
    tok = load_tokenizer(data_dir / "stories260K" / "tok512.bin")
    model = load_model(str(data_dir / "stories260K" / "stories260K.bin"), make_mesh(mesh))
    prompts = [[tok.bos_id] + tok.encode(t, add_bos=False) for t in ("Once upon a time", "The cat sat on the")]
    assert_pallas_equals_xla(model, prompts, max_tokens, buckets)


@pytest.mark.slow
@pytest.mark.parametrize("mesh,buckets", [("1x1", (2, 16)), ("2x4", (1, 16))])
def test_tiny_gqa_pallas_equals_xla(mesh, buckets):
    """A 20-token prompt runs as two chunks (the second attends to the first's pages) beside a 2-token one."""
    model = load_model("tiny", make_mesh(mesh), seed=3)  # random weights, 4 query / 2 KV heads
    prompts = [[5, 17, 99, 3, 42, 8, 200, 31, 64, 77, 12, 150, 7, 9, 250, 1, 2, 3, 4, 5], [11, 12]]
    assert_pallas_equals_xla(model, prompts, 4, buckets)
