"""Native XLA:CPU kernels, compiled on this host and called through the XLA FFI.

Each kernel is one C++ source here, built into its own shared library (`load_library`): `make install`
builds them all (`python -m jaxinfer.native`), and a missing one is built on first use.

`paged_context` reads a paged KV cache in place (see paged_context.cc). XLA:CPU cannot: it gathers
every token's pages into a fresh buffer and transposes them for its batched dots, which made
attention 20-35% of a decode step on a 2-core host. The TPU path is the Pallas kernel; GPU keeps
the XLA path.

`matmul.linear` (jaxinfer/native/matmul.py) is a linear layer with float32, bfloat16, int8 or 4-bit
weights, which XLA:CPU turns into a slow convert-then-dot.

A shared library is built with the host's C++ compiler (`$CXX`, else `g++`) against the FFI
headers jaxlib ships (`jax.ffi.include_dir()`), tuned for this CPU (`-march=native`), and cached in
`native/` of jaxinfer's cache directory (`$JAXINFER_CACHE`, default `~/.cache/jaxinfer`) under a name
hashed from the source (and the headers here), the jaxlib version, the flags and this CPU, so a change
to any of them rebuilds and concurrent processes never see a half-written file. `available()` says
whether the attention kernel could be built (`matmul.available()` the linear layer's); the engine's
`--attention auto` falls back to the XLA path (with one log line saying why) when it cannot.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import pathlib
import platform
import shutil
import subprocess
import tempfile

import jax
import jax.numpy as jnp
import numpy as np

from jaxinfer.paths import default_cache_dir

log = logging.getLogger(__name__)

HERE = pathlib.Path(__file__).parent
SOURCES = ("paged_context.cc", "matmul.cc")  # every kernel library, in build order
# -ffp-contract=fast: a multiply-add in the portable loops (no AVX-512) is one fused instruction where the CPU
# has FMA, as the AVX-512 intrinsics are (ISO C++ mode would keep them apart: half the rate)
FLAGS = ("-O3", "-march=native", "-std=c++17", "-fopenmp-simd", "-fno-math-errno", "-ffp-contract=fast")
FLAGS += ("-shared", "-fPIC")
TARGETS = {
    jnp.dtype(jnp.float32): "jaxinfer_paged_context_f32",
    jnp.dtype(jnp.bfloat16): "jaxinfer_paged_context_bf16",
    jnp.dtype(jnp.int8): "jaxinfer_paged_context_s8",
    jnp.dtype(jnp.float8_e4m3fn): "jaxinfer_paged_context_f8e4m3fn",
    jnp.dtype(jnp.float8_e5m2): "jaxinfer_paged_context_f8e5m2",
}
SYMBOLS = {
    "jaxinfer_paged_context_f32": "JaxinferPagedContextF32",
    "jaxinfer_paged_context_bf16": "JaxinferPagedContextBF16",
    "jaxinfer_paged_context_s8": "JaxinferPagedContextS8",
    "jaxinfer_paged_context_f8e4m3fn": "JaxinferPagedContextF8E4M3FN",
    "jaxinfer_paged_context_f8e5m2": "JaxinferPagedContextF8E5M2",
}


class NativeUnavailable(RuntimeError):
    """The native kernels could not be built or loaded on this host."""


def cache_dir() -> pathlib.Path:
    return default_cache_dir() / "native"


def _cpu_signature() -> str:
    """What -march=native depends on: the CPU model and feature flags (Linux), else the machine name."""
    try:
        info = pathlib.Path("/proc/cpuinfo").read_text()
        keep = [line for line in info.splitlines() if line.startswith(("model name", "flags", "Features"))]
        return platform.machine() + "\n" + "\n".join(sorted(set(keep)))
    except OSError:
        return platform.machine() + platform.processor()


def _build(compiler: str, source: pathlib.Path) -> pathlib.Path:
    import jaxlib

    headers = [h.read_text() for h in sorted(source.parent.glob("*.h"))]
    key = hashlib.sha256(
        "\n".join(
            [source.read_text(), *headers, jaxlib.__version__, compiler, " ".join(FLAGS), _cpu_signature()]
        ).encode()
    ).hexdigest()[:16]
    out = cache_dir() / f"libjaxinfer_{source.stem}_{key}.so"
    if out.exists():
        return out
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=out.parent)
        os.close(fd)
    except OSError as e:
        raise NativeUnavailable(
            f"cannot write the kernel cache {out.parent} ({e.strerror}); set JAXINFER_CACHE"
        ) from None
    cmd = [compiler, *FLAGS, "-isystem", jax.ffi.include_dir(), str(source), "-o", tmp]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        if done.returncode != 0:
            tail = " ".join(done.stderr.strip().splitlines()[-3:])
            raise NativeUnavailable(f"{compiler} failed (exit {done.returncode}) building {source.name}: {tail}")
        os.replace(tmp, out)  # atomic: another process either sees the whole library or none
    except (OSError, subprocess.TimeoutExpired) as e:
        raise NativeUnavailable(f"building {source.name} with {compiler}: {e}") from None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    log.info("built native CPU kernels: %s", out)
    return out


@functools.cache
def load_library(source: str) -> ctypes.CDLL:
    """The library of one kernel source here (built once per host and version); raises NativeUnavailable."""
    compiler = os.environ.get("CXX", "g++")
    if shutil.which(compiler) is None:
        raise NativeUnavailable(f"no C++ compiler: {compiler!r} is not on PATH (set CXX)")
    path = _build(compiler, HERE / source)
    try:
        return ctypes.cdll.LoadLibrary(str(path))
    except OSError as e:
        raise NativeUnavailable(f"cannot load {path}: {e} (delete it to rebuild)") from None


@functools.cache
def load() -> None:
    """Builds (once per host and version) and registers the paged-attention kernels; raises NativeUnavailable."""
    lib = load_library("paged_context.cc")
    for target, symbol in SYMBOLS.items():
        jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(lib, symbol)), platform="cpu")


@functools.cache
def unavailable_reason() -> str | None:
    """None when the native paged-attention kernels are ready on this host, else why not (one line)."""
    try:
        load()
    except NativeUnavailable as e:
        return str(e)
    return None


def available() -> bool:
    return unavailable_reason() is None


def paged_context(q, kv_pages, page_table, seq, limit, page_size: int | None = None):
    """Online-softmax state of each query over positions [0, limit[t]) of sequence seq[t]'s pages.

    q f32 [T, Hk, G, D] (already scaled); kv_pages [P, rows, 2*Hk, D] float32, bfloat16, float8_e4m3fn,
    float8_e5m2 or int8 (rows = page_size + its scale trailer, `pallas_kernels.ragged_paged_attention.
    quantized`), K of head h at 2h and V at 2h+1; page_size: tokens per page (default: rows);
    page_table i32 [S, W]; seq, limit i32 [T]. Returns (m, l, acc): f32 [T, Hk, G], [T, Hk, G],
    [T, Hk, G, D]; a row with no visible key gives (-inf, 0, 0).
    """
    load()
    target = TARGETS.get(jnp.dtype(kv_pages.dtype))
    if target is None:
        raise ValueError(f"native paged attention: cache dtype {kv_pages.dtype} is not one of {list(TARGETS)}")
    t, hk, g, d = q.shape
    out = (
        jax.ShapeDtypeStruct((t, hk, g), jnp.float32),
        jax.ShapeDtypeStruct((t, hk, g), jnp.float32),
        jax.ShapeDtypeStruct((t, hk, g, d), jnp.float32),
    )
    return jax.ffi.ffi_call(target, out)(
        q.astype(jnp.float32),
        kv_pages,
        page_table.astype(jnp.int32),
        seq.astype(jnp.int32),
        limit.astype(jnp.int32),
        page_size=np.int64(kv_pages.shape[1] if page_size is None else page_size),
    )
