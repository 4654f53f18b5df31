"""Start-up in-process: serving from the small buckets while the larger ones compile, and never
compiling on the serving path (`jaxinfer.compilation.startup`, `Engine.compile/install`)."""

import jax
import numpy as np
import pytest

from jaxinfer.checkpoint.load import load_model
from jaxinfer.compilation.startup import early_buckets, prepare
from jaxinfer.engine import compile_counter
from jaxinfer.engine.engine import Engine, EngineConfig
from jaxinfer.engine.requests import Request, SamplingParams
from jaxinfer.sharding import make_mesh

CONFIG = dict(max_slots=4, max_context=128, prefill_chunk=32, strict_no_recompile=True)


@pytest.fixture(scope="module")
def model(data_dir):
    return load_model(str(data_dir / "stories260K" / "stories260K.bin"), make_mesh("1x1"))


def requests():
    prompt = [1] + [30 + (7 * i) % 200 for i in range(40)]
    return [
        Request("greedy", prompt, SamplingParams(max_tokens=12)),
        Request("sampled", prompt[:25], SamplingParams(max_tokens=12, temperature=0.8, seed=5)),
    ]


def test_steps_stay_within_the_ready_buckets_and_nothing_compiles_while_serving(model):
    full = Engine(model, None, EngineConfig(**CONFIG))
    full.warmup()
    expected = [r.token_ids for r in full.generate(requests())]
    early = Engine(model, None, EngineConfig(**CONFIG))
    small = early_buckets(early)
    assert small == [1, 2, 4] and early.buckets == (1, 2, 4, 8, 16, 32)
    early.install(early.compile(small))
    compiles = compile_counter.count()
    got = [r.token_ids for r in early.generate(requests())]
    assert compile_counter.count() == compiles  # a 41-token prompt ran as chunks of at most 4 tokens
    assert got == expected
    assert set(early.status().steps_by_bucket) <= set(small) and early.status().buckets_ready == tuple(small)


def test_prepare_serving_early_compiles_the_larger_buckets_in_the_background(model):
    engine = Engine(model, None, EngineConfig(**CONFIG))
    thread = prepare(engine, None, serve_early=True)
    assert thread is not None and set(engine.ready_buckets) >= {1, 2, 4}
    assert engine.compilations_after_warmup == 0  # not armed until every bucket is in
    first = engine.generate(requests()[:1])[0]  # serves meanwhile
    thread.join(timeout=300)
    assert engine.ready_buckets == engine.buckets and engine.startup.background_s > 0
    assert set(engine.unproven_buckets) >= {8, 16} and 1 not in engine.unproven_buckets  # 1 ran: decodes
    while engine.warm_one():  # what the server's engine thread does when idle
        pass
    assert engine.unproven_buckets == ()
    assert engine.startup.compiled == len(engine.buckets) and engine.startup.loaded == 0
    assert engine.generate(requests()[:1])[0].token_ids == first.token_ids
    assert engine.compilations_after_warmup == 0
    assert set(engine.status().steps_by_bucket) - {1, 2, 4}  # the larger buckets were used once ready


def test_a_second_engine_on_the_same_store_traces_and_compiles_nothing(model, tmp_path):
    from jaxinfer.engine.step import step_traces

    first = Engine(model, None, EngineConfig(**CONFIG))
    prepare(first, str(tmp_path))
    expected = [r.token_ids for r in first.generate(requests())]
    second = Engine(model, None, EngineConfig(**CONFIG))
    traces, compiles = step_traces(), compile_counter.count()
    prepare(second, str(tmp_path))
    assert step_traces() == traces and compile_counter.count() == compiles  # counted, not reported
    assert second.startup.loaded == len(second.buckets) and second.startup.traced == 0
    assert [r.token_ids for r in second.generate(requests())] == expected
    assert compile_counter.count() == compiles
    third = Engine(model, None, EngineConfig(**CONFIG, min_bucket=8))  # a smaller bucket set: the same files
    prepare(third, str(tmp_path))
    assert third.buckets == (8, 16, 32) and (third.startup.loaded, third.startup.traced) == (3, 0)
    assert step_traces() == traces


def test_parameters_are_cached_only_in_the_cpu_layout_and_only_for_real_checkpoints(model, data_dir, tmp_path):
    from jaxinfer.checkpoint import params_cache

    source = str(data_dir / "stories260K" / "stories260K.bin")
    ident = params_cache.identity(source, model.mesh, "float32", "unrolled")
    assert ident["files"][0][0] == "stories260K.bin" and ident["layer_loop"] == "unrolled"
    assert params_cache.identity(source, model.mesh, "float32", "scan") is None  # TPU/GPU: Orbax places shards
    assert params_cache.identity("tiny", model.mesh, "float32", "unrolled") is None  # random weights
    params_cache.save(tmp_path, ident, model)
    again = params_cache.load(tmp_path, ident, model.mesh)
    for (path, a), (path2, b) in zip(
        sorted(jax.tree_util.tree_leaves_with_path(model.params), key=str),
        sorted(jax.tree_util.tree_leaves_with_path(again.params), key=str),
    ):
        assert path == path2 and a.sharding == b.sharding
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert (again.config, again.layout, again.layer_loop) == (model.config, model.layout, model.layer_loop)
