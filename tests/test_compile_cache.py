"""Persistent compile cache: a second `run` with the same --compile-cache compiles nothing and warms up faster;
an AOT compile for this machine fills the cache with exactly the engine's step executables."""

import re
import subprocess
import sys

import pytest

ARGS = [
    "--model",
    "tests/data/stories260K/stories260K.bin",
    "--mesh",
    "1x1",
    "--max-context",
    "128",
    "--prefill-chunk",
    "32",
    "--prompt",
    "Once upon a time",
    "--no-chat",
    "--max-tokens",
    "4",
]
BUCKETS = 6  # 1, 2, 4, 8, 16, 32 (the smallest bucket on CPU is 1)


def run(cache_dir):
    """-> (XLA compilations, persistent cache hits, warm-up seconds, generated text) of one batch job."""
    proc = subprocess.run(
        [sys.executable, "-m", "jaxinfer.run", *ARGS, "--compile-cache", str(cache_dir)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    compiles, hits = map(
        int, re.search(r"XLA compilations in this process (\d+) \(persistent cache hits (\d+)\)", proc.stderr).groups()
    )
    warmup = float(re.search(rf"warm-up compiled {BUCKETS} buckets in ([\d.]+)s", proc.stderr).group(1))
    return compiles, hits, warmup, proc.stdout


@pytest.fixture(scope="module")
def cold(tmp_path_factory):
    cache = tmp_path_factory.mktemp("cache")
    return cache, run(cache)


@pytest.fixture(scope="module")
def aot_dir(tmp_path_factory):
    """`python -m jaxinfer.aot --topology cpu --out DIR` with the batch job's engine flags."""
    out = tmp_path_factory.mktemp("aot")
    proc = subprocess.run(
        [sys.executable, "-m", "jaxinfer.aot", *ARGS[:8], "--topology", "cpu", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def test_second_run_compiles_nothing_and_warms_up_faster(cold):
    cache, (compiles, hits, warmup, text) = cold
    assert compiles >= BUCKETS and hits == 0
    compiles2, hits2, warmup2, text2 = run(cache)
    assert compiles2 == 0 and hits2 == compiles
    assert warmup2 < warmup / 2, (warmup, warmup2)
    assert text2 == text


def test_aot_for_this_machine_fills_the_cache_with_the_engines_steps(cold, aot_dir):
    _, (cold_compiles, *_) = cold
    assert len(list(aot_dir.glob("jit_step-*-cache"))) == BUCKETS
    compiles, hits, *_ = run(aot_dir)
    assert compiles <= cold_compiles - BUCKETS and hits >= BUCKETS
    assert len(list(aot_dir.glob("jit_step-*-cache"))) == BUCKETS  # no step with another signature compiled


def test_serialized_cpu_executables_load_and_match_the_engine(aot_dir):
    """`--out` executables deserialize after the manifest check and compute what the engine's step computes."""
    import jax
    import numpy as np

    from jaxinfer.checkpoint.load import load_model
    from jaxinfer.compilation.manifest import load_executables
    from jaxinfer.engine.engine import Engine, EngineConfig
    from jaxinfer.engine.step import build_step_fn
    from jaxinfer.engine.step_inputs import StepInputs
    from jaxinfer.sharding import make_mesh

    executables = load_executables(aot_dir)
    assert sorted(executables) == [1, 2, 4, 8, 16, 32]
    step = executables[8]
    model = load_model(ARGS[1], make_mesh("1x1", jax.devices()[:1]))
    engine = Engine(model, None, EngineConfig(max_context=128, prefill_chunk=32))
    inputs = StepInputs.from_flat(jax.device_put(engine.inputs.empty(8)))  # the engine's idle bucket-8 step
    prev = jax.numpy.zeros((1, engine.config.max_slots), jax.numpy.int32)
    tokens, logprobs, _ = step(model.params, jax.tree.map(jax.numpy.copy, engine.cache), inputs, prev)
    own_step = build_step_fn(model, engine.cache_shape, engine.platform)
    want, want_lp, _ = own_step(model.params, engine.cache, inputs, prev)
    np.testing.assert_array_equal(np.asarray(tokens), np.asarray(want))
    np.testing.assert_array_equal(np.asarray(logprobs), np.asarray(want_lp))
