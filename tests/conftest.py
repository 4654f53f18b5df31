"""Test setup: 8 host CPU devices, set before JAX initialises, so meshes up to 2x4 / 1x2x4 run on CPU."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# pytest-xdist workers each load libtpu for the TPU AOT-compile tests; let them share it.
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
_flag = "--xla_force_host_platform_device_count=8"
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

import pytest  # noqa: E402

DATA = pathlib.Path(__file__).parent / "data"


@pytest.fixture(scope="session")
def data_dir() -> pathlib.Path:
    return DATA
