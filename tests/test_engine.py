"""The engine on real checkpoints: batching invariance, zero recompiles, preemption, continuous batching."""

import random

import numpy as np
import pytest

from jaxinfer.checkpoint.load import load_model
from jaxinfer.config import ConfigError
from jaxinfer.engine.engine import Engine, EngineConfig
from jaxinfer.engine.requests import Request, RequestError, SamplingParams
from jaxinfer.sharding import make_mesh
from tests.dense_greedy import greedy_dense_rows

STORY_PROMPTS = [
    "Once upon a time",
    "The cat sat",
    "Lily and Ben went to the park. They saw a big dog and",
    "One day, a little boy named Tim",
    "The sun was hot",
    "Mom said",
    "A bird",
    "Sue had a red ball",
]


def make_engine(model, tok, **kw):
    # steps of 8 and 16 tokens (TPU's smallest bucket): two shapes to compile instead of the CPU's five from 1;
    # the tests of the bucket set itself pass min_bucket=None
    cfg = dict(max_slots=4, max_context=256, prefill_chunk=16, page_size=16, min_bucket=8)
    engine = Engine(model, tok, EngineConfig(**{**cfg, **kw}))
    engine.warmup()
    return engine


def story_request(tok, i, text, **params):
    return Request(f"r{i}", [tok.bos_id] + tok.encode(text, add_bos=False), SamplingParams(**params))


@pytest.mark.parametrize("mesh", ["1x1", "2x4"])
def test_engine_greedy_equals_dense_forward(stories, mesh):
    """Paged cache + chunked prefill + continuous batching give the plain causal forward's tokens."""
    models, tok = stories
    engine = make_engine(models[mesh], tok, min_bucket=None)
    reqs = [story_request(tok, i, p, max_tokens=12 + 5 * i) for i, p in enumerate(STORY_PROMPTS)]
    results = engine.generate(reqs)
    assert engine.compilations_after_warmup == 0  # (counts every compile in the process: check first)
    expected = greedy_dense_rows(
        models[mesh], [r.prompt_ids for r in reqs], [r.params.max_tokens for r in reqs], tok.eos_ids
    )
    for req, res, want in zip(reqs, results, expected):
        assert res.token_ids == want, req.id


@pytest.mark.parametrize("params", [dict(max_tokens=30), dict(max_tokens=30, temperature=0.8, top_p=0.9, seed=7)])
def test_output_independent_of_batch(stories, params):
    models, tok = stories
    engine = make_engine(models["2x4"], tok, max_slots=16)
    target = story_request(tok, 99, "Once upon a time, in a small town,", **params)
    alone = engine.generate([target])[0]
    others = [
        story_request(tok, i, random.Random(i).choice(STORY_PROMPTS), max_tokens=10 + 3 * i, temperature=0.7, seed=i)
        for i in range(15)
    ]
    target2 = story_request(tok, 99, "Once upon a time, in a small town,", **params)
    busy = {r.id: r for r in engine.generate(others[:7] + [target2] + others[7:])}
    assert busy["r99"].token_ids == alone.token_ids
    assert len(alone.token_ids) == 30 or alone.finish_reason == "stop"


def test_fifty_random_requests_cause_zero_compilations(stories):
    models, tok = stories
    engine = make_engine(models["2x4"], tok, strict_no_recompile=True, min_bucket=None)
    rng = random.Random(0)
    reqs = []
    for i in range(50):
        prompt = [tok.bos_id] + [rng.randrange(3, 512) for _ in range(rng.randrange(1, 120))]
        reqs.append(
            Request(
                f"q{i}",
                prompt,
                SamplingParams(
                    max_tokens=rng.randrange(1, 40),
                    temperature=rng.choice([0.0, 0.9]),
                    seed=i,
                    top_k=rng.choice([0, 20]),
                ),
            )
        )
    results = engine.generate(reqs)
    assert [r.id for r in results] == [r.id for r in reqs]
    assert engine.compilations_after_warmup == 0
    assert all(r.completion_tokens == q.params.max_tokens or r.finish_reason == "stop" for r, q in zip(results, reqs))


def test_preemption_is_invisible(stories):
    """With too few KV pages for all requests at once, outputs equal those with ample memory."""
    models, tok = stories
    reqs = lambda: [
        story_request(tok, i, p, max_tokens=60, temperature=0.0 if i % 2 else 0.8, seed=i)  # noqa: E731
        for i, p in enumerate(STORY_PROMPTS)
    ]
    # max_slots=16 as in test_output_independent_of_batch (the same compiled steps: a persistent-cache hit);
    # the eight requests run together in either, and with more slots there are more pages still
    ample = make_engine(models["2x4"], tok, max_slots=16)
    expected = [r.token_ids for r in ample.generate(reqs())]
    tight = make_engine(models["2x4"], tok, max_slots=8, kv_pages=16)  # 16 pages/shard, 4 slots x ~5 pages needed
    got = tight.generate(reqs())
    assert tight.status().preemptions > 0
    assert [r.token_ids for r in got] == expected
    assert tight.status().pages_used == 0  # every page returned


def test_a_request_id_in_flight_is_refused_and_the_first_request_keeps_it(stories):
    """Results are matched to requests by id: a second request with the id of one in flight would replace
    its output stream and never finish (the batch job spun a core on a repeated JSONL id)."""
    models, tok = stories
    engine = Engine(models["1x1"], tok, EngineConfig(max_slots=2, max_context=256))  # no step runs: no compile
    first = story_request(tok, 9, "The cat", max_tokens=5)
    engine.submit(first)
    with pytest.raises(RequestError, match="request id 'r9' is already in flight"):
        engine.submit(story_request(tok, 9, "The dog", max_tokens=5))
    assert engine.scheduler.find("r9").request is first
    assert engine.cancel("r9").finish_reason == "cancelled" and not engine.has_work()
    engine.submit(story_request(tok, 9, "The dog", max_tokens=5))  # no longer in flight: the id is free
    assert engine.scheduler.find("r9").request.prompt_ids != first.prompt_ids


def test_continuous_batching_refills_slots(stories):
    models, tok = stories
    engine = make_engine(models["1x1"], tok, max_slots=2)
    long = story_request(tok, 0, "Once upon a time", max_tokens=120, ignore_eos=True)
    shorts = [story_request(tok, i, "The cat", max_tokens=5) for i in range(1, 6)]
    order = []
    engine.generate([long] + shorts, on_event=lambda ev: ev.result and order.append(ev.request_id))
    assert order[-1] == "r0"  # five short requests came and went through the second slot meanwhile
    status = engine.status()
    assert status.active_slots == 0 and status.pages_used == 0


def test_stop_strings_and_tokens(stories):
    models, tok = stories
    engine = make_engine(models["1x1"], tok)
    free = engine.generate([story_request(tok, 0, "Once upon a time", max_tokens=40)])[0]
    assert "Lily" in free.text
    stopped = engine.generate([story_request(tok, 1, "Once upon a time", max_tokens=40, stop=("Lily",))])[0]
    assert stopped.finish_reason == "stop"
    assert stopped.text == free.text[: free.text.index("Lily")]
    first = free.token_ids[3]
    by_id = engine.generate([story_request(tok, 2, "Once upon a time", max_tokens=40, stop_token_ids=(first,))])[0]
    assert by_id.token_ids == free.token_ids[:4] and by_id.finish_reason == "stop"


def test_logprobs_are_log_softmax_of_model(stories):
    models, tok = stories
    engine = make_engine(models["1x1"], tok)
    req = story_request(tok, 0, "Once upon a time", max_tokens=3, logprobs=True)
    res = engine.generate([req])[0]
    logits = models["1x1"].logits(np.asarray([req.prompt_ids]))[0, -1]
    expected = logits[res.token_ids[0]] - np.log(np.exp(logits - logits.max()).sum()) - logits.max()
    assert abs(res.logprobs[0] - expected) < 1e-4


def test_scanned_and_unrolled_layers_generate_the_same(data_dir, stories):
    """The CPU default (one array per layer, a per-layer cache tuple) and the TPU/GPU layout (scanned
    stacked layers, one stacked cache) are the same model: same greedy tokens on a 2x4 mesh."""
    _, tok = stories
    path = str(data_dir / "stories260K" / "stories260K.bin")
    outputs = {}
    for loop in ("scan", "unrolled"):
        model = load_model(path, make_mesh("2x4"), layer_loop=loop)
        engine = make_engine(model, tok, layer_loop=loop)
        assert model.layer_loop == loop
        if loop == "unrolled":
            assert isinstance(engine.cache, tuple) and len(engine.cache) == model.config.num_layers
            assert "layers" not in model.params and "layers_0" in model.params
            q0, c = model.params["layers_0"]["attn"]["q"], model.config
            assert q0.shape == (model.layout.q_heads, c.head_dim, c.hidden_size)  # output-major
            assert q0.shape == model.params["layers_1"]["attn"]["q"].shape and q0.sharding.spec[0] == "tensor"
            down = model.params["layers_0"]["mlp"]["down"]
            assert down.shape == (c.hidden_size, model.layout.mlp) and down.sharding.spec[1] == "tensor"
        else:
            assert engine.cache.shape[0] == model.config.num_layers
        reqs = [story_request(tok, i, p, max_tokens=10) for i, p in enumerate(STORY_PROMPTS[:4])]
        outputs[loop] = [r.token_ids for r in engine.generate(reqs)]
        if loop == "unrolled":  # an engine refuses params in another layer loop than its platform policy's
            with pytest.raises(ConfigError, match="--layer-loop scan: the model was loaded with layer loop unrolled"):
                Engine(model, tok, EngineConfig(max_slots=4, max_context=256, layer_loop="scan"))
            with pytest.raises(ValueError, match="this model's params are already unrolled"):
                model.with_layer_loop("scan")
    assert outputs["scan"] == outputs["unrolled"]


def test_max_step_tokens_sets_the_largest_bucket(stories):
    models, tok = stories
    engine = make_engine(models["1x1"], tok, prefill_chunk=16, max_step_tokens=64)
    assert engine.buckets[-1] == 64
    reqs = [story_request(tok, i, (p + ". ") * 4, max_tokens=4) for i, p in enumerate(STORY_PROMPTS[:4])]
    engine.generate(reqs)
    assert engine.status().steps_by_bucket[64] >= 1  # four 16-token prompt chunks share one step
    with pytest.raises(ConfigError, match=r"--max-step-tokens 2 must be >= the slots per data shard \(4\)"):
        Engine(models["1x1"], tok, EngineConfig(max_slots=4, max_context=256, max_step_tokens=2))


def test_a_failed_read_back_on_a_multi_host_leader_ends_the_cluster(stories):
    """A step runs asynchronously: when a peer dies inside its collectives, the error surfaces only when
    process 0 reads the step's tokens back. That read-back must go through the cluster too, which waits
    for the lost process to be named (a race seen in CI: the raw Gloo error reached the client)."""
    from jaxinfer.multihost.replica import Replicas

    class FakeCluster:
        sent, fatal_messages = [], []

        def broadcast(self, kind, meta, arrays):
            self.sent.append(kind)

        def failed_call(self, message):
            self.fatal_messages.append(message)

    models, tok = stories
    engine = make_engine(models["1x1"], tok)
    cluster = FakeCluster()
    engine.replicas = Replicas(cluster)

    def collect(pending):
        raise RuntimeError("Gloo all-reduce failed: Connection reset by peer")

    engine._collect = collect
    engine.submit(story_request(tok, 0, "Once upon a time", max_tokens=4))
    engine.step()  # dispatches; nothing to read back yet
    with pytest.raises(RuntimeError, match="Gloo"):
        engine.step()
    assert cluster.sent == ["step", "step"]
    assert cluster.fatal_messages == [
        "process 0 failed reading back a step's results: RuntimeError: Gloo all-reduce failed: Connection reset by peer"
    ]
