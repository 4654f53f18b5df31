"""The platform policy: what each platform runs, and the native kernel's fallback and refusal. These run
on any machine, with or without a C++ compiler (availability is replaced where a test needs it)."""

import os
import subprocess
import sys

import pytest

from jaxinfer import native
from jaxinfer import platform as platforms
from jaxinfer.config import ConfigError


@pytest.fixture
def native_builds(monkeypatch):
    monkeypatch.setattr(native, "available", lambda: True)


@pytest.fixture
def no_compiler(monkeypatch):
    monkeypatch.setattr(native, "unavailable_reason", lambda: "no C++ compiler: 'g++' is not on PATH (set CXX)")
    monkeypatch.setattr(native, "available", lambda: False)


def test_each_platform_gets_its_defaults(native_builds):
    cpu, tpu, gpu = (platforms.resolve(p) for p in ("cpu", "tpu", "gpu"))
    assert (cpu.attention, cpu.layer_loop, cpu.min_bucket, cpu.interpret) == ("native", "unrolled", 1, True)
    assert (tpu.attention, tpu.layer_loop, tpu.min_bucket, tpu.interpret) == ("pallas", "scan", 8, False)
    assert (gpu.attention, gpu.layer_loop, gpu.min_bucket, gpu.interpret) == ("xla", "scan", 8, True)
    explicit = platforms.resolve("cpu", attention="xla", layer_loop="scan", min_bucket=4)
    assert (explicit.attention, explicit.layer_loop, explicit.min_bucket) == ("xla", "scan", 4)


def test_native_is_refused_off_cpu(native_builds):
    with pytest.raises(ConfigError, match="--attention native: runs only on CPU; this mesh is on gpu"):
        platforms.resolve("gpu", attention="native")


def test_unavailable_native_falls_back_or_refuses(no_compiler, caplog):
    assert platforms.resolve("cpu").attention == "xla"
    assert "native CPU kernel is unavailable: no C++ compiler" in caplog.text
    with pytest.raises(ConfigError, match="--attention native: unavailable on this host: no C\\+\\+ compiler"):
        platforms.resolve("cpu", attention="native")


def test_unknown_choices_are_config_errors():
    with pytest.raises(ConfigError, match="--attention 'kernel': must be auto, pallas, xla or native"):
        platforms.resolve("tpu", attention="kernel")
    with pytest.raises(ConfigError, match="--layer-loop 'flat': must be auto, scan or unrolled"):
        platforms.resolve("tpu", layer_loop="flat")


@pytest.mark.parametrize(
    "cxx,expected",
    [
        ("no-such-compiler-xyz", "no C++ compiler: 'no-such-compiler-xyz' is not on PATH"),
        ("false", "false failed (exit 1) building paged_context.cc"),
    ],
)
def test_build_failure_is_one_clear_line(tmp_path, cxx, expected):
    """A fresh process with a broken compiler: available() is False with the reason; nothing raises."""
    env = dict(os.environ, CXX=cxx, JAXINFER_CACHE=str(tmp_path))
    code = "from jaxinfer import native; print(native.available()); print(native.unavailable_reason())"
    out = subprocess.run(
        [sys.executable, "-c", code],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
    )
    assert out.returncode == 0, out.stderr
    available, reason = out.stdout.strip().splitlines()[-2:]
    assert available == "False" and reason.startswith(expected), reason
