"""Device facts and roofline arithmetic: memory bandwidth per device and decode MBU."""

from __future__ import annotations

import jax
import numpy as np

from jaxinfer.sharding import per_device_bytes

# Peak HBM bandwidth per device (bytes/s), by `device_kind` substring. Published figures.
PEAK_BANDWIDTH = {
    "TPU v5 lite": 819e9,
    "TPU v5e": 819e9,
    "TPU v5p": 2765e9,
    "TPU v5": 2765e9,
    "TPU v6": 1640e9,
    "TPU v4": 1228e9,
    "H200": 4.8e12,
    "H100": 3.35e12,
    "A100": 2.0e12,
}


def peak_bandwidth(device=None) -> float | None:
    device = device or jax.devices()[0]
    for key, bw in PEAK_BANDWIDTH.items():
        if key in device.device_kind:
            return bw
    return None


def decode_mbu(engine, elapsed: float) -> str:
    """Lower-bound MBU of the run: each step reads every parameter shard once (KV reads not counted)."""
    steps = engine.status().steps
    bw = peak_bandwidth(engine.model.mesh.devices.flat[0])
    if not steps or elapsed <= 0:
        return "MBU: n/a (no steps)"
    achieved = per_device_bytes(engine.model.params) * steps / elapsed
    if bw is None:
        kind = engine.model.mesh.devices.flat[0].device_kind
        return f"MBU: n/a (peak bandwidth of {kind!r} unknown); weights read {achieved / 1e9:.2f} GB/s per device"
    return f"MBU (weights only, lower bound): {achieved / bw:.1%} of {bw / 1e9:.0f} GB/s"


def measure_bandwidth(device=None, megabytes: int = 256, repeats: int = 5) -> float:
    """Achieved device memory bandwidth (bytes/s): median over copies of a large array (read + write)."""
    import jax.numpy as jnp

    device = device or jax.devices()[0]
    x = jax.device_put(jnp.ones((megabytes * 2**20 // 4,), jnp.float32), device)
    return 2 * x.nbytes / _median_seconds(jax.jit(lambda a: a * 1.0000001), x, repeats)


def measure_matmul_flops(device=None, size: int = 2048, dtype="float32", repeats: int = 5) -> float:
    """Achieved dense matmul throughput (FLOP/s) of one device: the MFU denominator where no peak is known."""
    import jax.numpy as jnp

    device = device or jax.devices()[0]
    a = jax.device_put(jnp.ones((size, size), dtype), device)
    return 2 * size**3 / _median_seconds(jax.jit(lambda a: a @ a), a, repeats)


def kv_bytes_read_per_device(cache_shape, total_context_tokens: int, tensor: int) -> int:
    """KV bytes one device reads in a decode step whose sequences hold `total_context_tokens` in all."""
    per_token = cache_shape.bytes_per_page // cache_shape.page_size  # all layers, K and V, all KV heads
    return total_context_tokens * per_token // tensor


def _median_seconds(fn, arg, repeats: int) -> float:
    """Median wall time of `fn(arg)` to completion over `repeats` runs, after one warm-up run."""
    import time

    fn(arg).block_until_ready()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn(arg).block_until_ready()
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def write_report(result, path: str | None):
    """The benchmark scripts' last step: `result` as indented JSON to `path` (when given); returns it."""
    if path:
        import json

        with open(path, "w") as f:
            json.dump(result, f, indent=2)
    return result


class HostMemoryPeak:
    """`with HostMemoryPeak() as peak: ...` -> `peak.bytes`: how far this process's resident memory rose
    above its level at entry, at its highest (Linux: the kernel's high-water mark, reset at entry). None
    where the kernel does not offer it."""

    def __enter__(self):
        self.bytes = None
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # resets VmHWM to the current resident size
            self._start = _status_kib("VmRSS")
        except OSError:
            self._start = None
        return self

    def __exit__(self, *exc):
        if self._start is not None:
            self.bytes = (_status_kib("VmHWM") - self._start) * 1024
        return False


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise OSError(f"/proc/self/status has no {field}")
