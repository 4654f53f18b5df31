"""Test setup: 8 host CPU devices, set before JAX initialises, so meshes up to 2x4 / 1x2x4 run on CPU."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# pytest-xdist workers each load libtpu for the TPU AOT-compile tests; let them share it.
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
# One OpenMP thread (torch, the transformers references; OpenBLAS): `make test` runs two workers on two
# cores, and torch's two spinning OpenMP threads beside the other worker's XLA compiles made transformers'
# greedy generate of SmolLM2 take 150 s instead of 5 s (measured, 2026-11-30).
os.environ.setdefault("OMP_NUM_THREADS", "1")
# XLA:CPU's LLVM code generation at -O0: most of the suite's time is XLA:CPU compiling steps, and -O0 takes
# about a third off each compile (XLA's own HLO passes, which decide what is computed, run as before) for
# steps that run up to ~1.5x slower, which the tiny test models hardly feel. TPU AOT compiles report the
# same costs and memory with it (scripts/kernels_tpu_compile.py --small).
# Two more cut the compile CPU of the tests' steps (docs/PERFORMANCE.md, "Compiling the tests' steps"):
# XLA:CPU's elemental fusion emitters instead of its MLIR ones (each fusion goes straight to LLVM IR
# instead of through a pipeline of MLIR passes), and the module compiled as one piece instead of split
# for parallel code generation (the test workers already fill both cores). A stories260K engine's nine
# buckets took 36 s of compile CPU with neither, 13-16 s with the first and 10.6-12.8 s with both.
# And XLA's HLO verifier, which checks the module's invariants between passes (a check of XLA itself: the
# compiled program is the same): a third of the HLO passes' time, 11% of a stories260K engine's compile
# (five buckets: 7.8-8.3 s of CPU with it, 6.3-7.4 s without, alternating; TPU compiles do not read it).
for _flag in (
    "--xla_force_host_platform_device_count=8",
    "--xla_backend_optimization_level=0",
    "--xla_cpu_use_fusion_emitters=false",
    "--xla_cpu_parallel_codegen_split_count=1",
    "--xla_disable_hlo_passes=hlo-verifier",
):
    if _flag not in os.environ.get("XLA_FLAGS", ""):
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _flag).strip()

import pathlib  # noqa: E402

# One persistent XLA compilation cache for the session, shared by both xdist workers and the servers and
# batch jobs the tests start: many tests build engines with identical steps, and each new engine would
# otherwise compile them again. Tests of the cache itself pass their own --compile-cache directory.
os.environ.setdefault(
    "JAX_COMPILATION_CACHE_DIR",
    str(pathlib.Path(__file__).resolve().parent.parent / ".pytest_cache" / "jax-compile-cache"),
)
# every compilation, not only those over JAX's default 1 s: each batch job or server the tests start would
# otherwise compile the small programs (parameter layout, cache allocation, ...) of the one before again
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")

import pytest  # noqa: E402

DATA = pathlib.Path(__file__).parent / "data"


@pytest.fixture(scope="session")
def data_dir() -> pathlib.Path:
    return DATA


@pytest.fixture(scope="module")
def stories(data_dir):
    """({mesh: stories260K loaded on it} for 1x1 and 2x4, its tokenizer): once per module that asks."""
    from jaxinfer.checkpoint.load import load_model
    from jaxinfer.sharding import make_mesh
    from jaxinfer.tokenizer import load_tokenizer

    tok = load_tokenizer(data_dir / "stories260K" / "tok512.bin")
    models = {m: load_model(str(data_dir / "stories260K" / "stories260K.bin"), make_mesh(m)) for m in ("1x1", "2x4")}
    return models, tok


# The longest modules first, as measured with `make test` on a 2-core machine (longest first; the rest keep
# their file order after these). `--dist loadfile` runs each module whole on one worker, and xdist hands
# modules out in collection order (pyproject.toml sets --no-loadscope-reorder: by default xdist would
# hand out the modules with the most tests first, which leaves the few-but-long ones such as the README
# and Pallas modules for the end, run by one worker while the other idles). Only the order of modules
# changes here; tests within a module keep their file order, which the server modules rely on.
LONGEST_MODULES_FIRST = [
    "test_readme.py",
    "test_engine_kernel_attention.py",
    "test_benchmarks.py",
    "test_multihost.py",
    "test_speculative.py",
    "test_perplexity.py",
    "test_quantization.py",
    "test_kv_quant.py",
    "test_kv_quant_engine.py",
    "test_engine.py",
    "test_compile_cache.py",
    "test_reference_models.py",
    "test_aot.py",
    "test_notebooks_serving.py",
    "test_prefix_cache_engine.py",
    "test_notebooks.py",
    "test_ragged_paged_attention.py",
    "test_kv_quant.py",
    "test_native_paged_attention.py",
    "test_kv_quant_engine.py",
    "test_run_cli.py",
    "test_logprobs.py",
    "test_distill.py",
    "test_server.py",
    "test_model_parity.py",
    "test_startup.py",
    "test_soak.py",
    "test_http.py",
    "test_flash_attention.py",
    "test_xla_paged_attention.py",
    "test_checkpoint_native.py",
    "test_logit_adjustments.py",
]


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(LONGEST_MODULES_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # a stable sort: file order within a module
