"""Start-up from `--compile-cache DIR`: a second `run` loads every step executable (no tracing, no
compiling), a changed flag or a corrupted file is named in one line and rebuilt, and an AOT compile for
this machine writes the engine's steps where `run --compile-cache` loads them."""

import json
import re
import shutil
import subprocess
import sys

import pytest

# 2 slots and chunks of 8 tokens: buckets 1, 2 (decodes, loaded first by a server) and 4, 8 (the smallest
# bucket on CPU is 1). Every bucket is stored, loaded and refused alike, so four show what six would, and
# each start that compiles them all costs a third less.
ENGINE = ["--model", "tests/data/stories260K/stories260K.bin", "--mesh", "1x1", "--max-slots", "2"]
ENGINE += ["--max-context", "128", "--prefill-chunk", "8"]
ARGS = [*ENGINE, "--prompt", "Once upon a time", "--no-chat", "--max-tokens", "4"]
BUCKETS = 4
STARTUP = re.compile(
    r"start-up ([\d.]+)s: model load [\d.]+s; (\d+) executables loaded in [\d.]+s; (\d+) traced in [\d.]+s; "
    r"(\d+) compiled in [\d.]+s"
)


def run(cache_dir, *extra):
    """One batch job -> dict: XLA compilations in the process, start-up figures, text, stderr."""
    proc = subprocess.run(
        [sys.executable, "-m", "jaxinfer.run", *ARGS, *extra, "--compile-cache", str(cache_dir)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    compiles = int(re.search(r"XLA compilations in this process (\d+)", proc.stderr).group(1))
    ready, loaded, traced, compiled = STARTUP.search(proc.stderr).groups()
    return dict(
        compiles=compiles,
        ready=float(ready),
        loaded=int(loaded),
        traced=int(traced),
        compiled=int(compiled),
        text=proc.stdout,
        log=proc.stderr,
    )


@pytest.fixture(scope="module")
def cold(tmp_path_factory):
    cache = tmp_path_factory.mktemp("cache")
    return cache, run(cache)


@pytest.fixture(scope="module")
def aot_dir(tmp_path_factory):
    """`python -m jaxinfer.aot --topology cpu --out DIR` with the batch job's engine flags."""
    out = tmp_path_factory.mktemp("aot")
    proc = subprocess.run(
        [sys.executable, "-m", "jaxinfer.aot", *ENGINE, "--topology", "cpu", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def step_files(root):
    return sorted(p.name for p in root.glob("jaxinfer-steps/*/bucket_*.xla"))


def test_second_start_loads_every_step_and_traces_and_compiles_nothing(cold):
    cache, first = cold
    assert (first["loaded"], first["traced"], first["compiled"]) == (0, BUCKETS, BUCKETS)
    assert "step cache miss: no executables stored" in first["log"]
    assert len(step_files(cache)) == BUCKETS
    assert (
        len(list(cache.glob("jaxinfer-params/*/meta.json"))) == 1 and "loaded from --compile-cache" not in first["log"]
    )
    second = run(cache)
    assert "loaded from --compile-cache" in second["log"]  # the parameters as the engine runs them, memory-mapped
    assert (second["loaded"], second["traced"], second["compiled"]) == (BUCKETS, 0, 0)
    assert second["compiles"] == 0  # nothing at all: the rest (cache allocation, ...) hit JAX's own cache
    assert second["text"] == first["text"]
    assert second["ready"] < first["ready"]


def test_a_changed_flag_misses_with_one_line_naming_it(cold):
    cache, _ = cold
    out = run(cache, "--max-slots", "4")
    misses = [line for line in out["log"].splitlines() if "step cache miss" in line]
    assert len(misses) == 1 and "--max-slots inputs.slots_per_shard: 2 -> 4" in misses[0], misses
    assert (out["loaded"], out["traced"]) == (0, BUCKETS)


def test_a_corrupted_step_file_is_refused_in_one_line_and_rebuilt(cold, tmp_path):
    """A truncated step file and an unreadable params-cache manifest (both in one start: each is refused on
    its own line and rebuilt), then an unreadable signature."""
    cache, first = cold
    copy = tmp_path / "cache"
    shutil.copytree(cache, copy)
    (signature,) = [  # the batch job's own steps (another test stored a --max-slots 4 set beside them)
        p
        for p in copy.glob("jaxinfer-steps/*/signature.json")
        if json.loads(p.read_text())["inputs"]["slots_per_shard"] == 2
    ]
    victim = signature.parent / "bucket_8.xla"
    victim.write_bytes(victim.read_bytes()[:1000])  # truncated, as by a full disk
    meta = next(copy.glob("jaxinfer-params/*/meta.json"))
    meta.write_text("{")
    out = run(copy)
    refused = [line for line in out["log"].splitlines() if "refused" in line]
    assert len(refused) == 2, refused
    (step,) = [line for line in refused if "params cache" not in line]
    assert str(victim) in step and "rebuilding" in step, refused
    assert (out["loaded"], out["traced"], out["compiled"]) == (BUCKETS - 1, 1, 1)
    assert out["text"] == first["text"] and "loaded from --compile-cache" not in out["log"]
    rebuilt = run(copy)
    assert rebuilt["loaded"] == BUCKETS and "loaded from --compile-cache" in rebuilt["log"]  # both rebuilt in place
    signature.write_text("{not json")
    out = run(copy)
    assert sum("unreadable signature" in line for line in out["log"].splitlines()) == 1
    assert (out["loaded"], out["traced"]) == (0, BUCKETS)


def test_aot_for_this_machine_writes_the_engines_steps_and_run_loads_them(cold, aot_dir):
    assert step_files(aot_dir) == sorted(f"bucket_{b}.xla" for b in (1, 2, 4, 8))
    out = run(aot_dir)
    assert (out["loaded"], out["traced"], out["compiled"]) == (BUCKETS, 0, 0)
    assert out["text"] == cold[1]["text"]


def test_serialized_cpu_executables_load_and_match_the_engine(aot_dir):
    """`--out` executables deserialize after the manifest check and compute what the engine's step computes."""
    import jax
    import numpy as np

    from jaxinfer.checkpoint.load import load_model
    from jaxinfer.compilation.manifest import load_executables
    from jaxinfer.engine.engine import Engine, EngineConfig
    from jaxinfer.engine.packed_inputs import PackedInputs
    from jaxinfer.engine.step import build_step_fn
    from jaxinfer.sharding import make_mesh

    executables = load_executables(aot_dir)
    assert sorted(k for k in executables if isinstance(k, int)) == [1, 2, 4, 8]
    assert set(executables) - {1, 2, 4, 8} == {"penalty_rows"}  # the sampler state's row writer
    step = executables[8]
    model = load_model(ARGS[1], make_mesh("1x1", jax.devices()[:1]))
    engine = Engine(model, None, EngineConfig(max_slots=2, max_context=128, prefill_chunk=8))
    inputs = jax.device_put(PackedInputs.pack(engine.inputs.empty(8)))  # the engine's idle bucket-8 step
    copy = lambda tree: jax.tree.map(jax.numpy.copy, tree)
    got, _, _ = step(model.params, copy(engine.cache), inputs, copy(engine.state))
    own_step = build_step_fn(model, engine.cache_shape, engine.platform)
    want, _, _ = own_step(model.params, engine.cache, inputs, engine.state)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_a_warm_server_loads_the_decode_buckets_before_serving_and_the_rest_after(cold):
    """The server on the batch job's cache: SERVING after loading the buckets decodes need (no tracing),
    then the larger ones load in the background; nothing is traced or compiled at all."""
    from tests.test_server import ServerProcess

    cache, _ = cold
    # the batch job's engine flags, with its buckets from 1 (test_server's flags start at 8)
    srv = ServerProcess(*ENGINE[2:], "--min-bucket", "1", "--compile-cache", str(cache))
    try:
        srv.wait_for(r"SERVING stories260K: 2 slots, queue \d+, buckets \(1, 2\) ready", timeout=60)
        done = srv.wait_for(r"all buckets ready \(1, 2, 4, 8\): (.*)", timeout=60)
    finally:
        srv.stop()
    first = STARTUP.search(srv.log())
    assert first.groups()[1:] == ("2", "0", "0")  # loaded, traced, compiled before SERVING
    assert STARTUP.search(done.group(1)).groups()[1:] == ("4", "0", "0")
