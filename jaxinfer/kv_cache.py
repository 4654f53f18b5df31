"""Paged KV cache: the device pytree, its sharding, and the host-side page allocator.

Device layout (donated to every step and updated in place), one array for all layers when the
model's layer loop is `scan`:
    pages: [layers, data * pages_per_shard, page_size, 2 * kv_heads, head_dim]
or, when it is `unrolled` (CPU), a tuple of `layers` arrays [data * pages_per_shard, page_size, ...].
The dtype is `--kv-dtype`'s: the model's float dtype, float8_e4m3fn (values only), or int8, whose pages
have E = ceil(4 * page_size / head_dim) more rows holding a float32 scale per (token, kv head)
(`pallas_kernels.ragged_paged_attention.quantized`; K/V are quantized as they are written).
K and V are interleaved on the combined head axis (index 2h is K of head h, 2h+1 its V), the
layout of the ragged paged attention kernel. Pages are split over `data` (each data shard owns
a contiguous block of pages and the slots that use them) and combined heads over `tensor`.
Page numbers inside a shard's page tables are local to that shard.
"""

from __future__ import annotations

import dataclasses
import logging
import os

import jax
import jax.numpy as jnp

from jaxinfer.sharding import logical_sharding
from pallas_kernels.ragged_paged_attention.quantized import page_rows

log = logging.getLogger(__name__)

CACHE_AXES = ("cache_layers", "cache_pages", "cache_page_tokens", "cache_kv_heads", "cache_head_dim")


@dataclasses.dataclass(frozen=True)
class CacheShape:
    layers: int
    data_shards: int
    pages_per_shard: int
    page_size: int
    kv_heads: int  # physical (padded) KV heads
    head_dim: int
    dtype: str  # storage: float32 | bfloat16 | float8_e4m3fn | int8 (with its scale rows)

    @property
    def page_rows(self) -> int:
        """Rows of one page: its tokens, plus the scale rows of an int8 page."""
        return page_rows(self.page_size, self.head_dim, self.dtype)

    @property
    def shape(self) -> tuple[int, ...]:
        return (self.layers, self.data_shards * self.pages_per_shard, self.page_rows, 2 * self.kv_heads, self.head_dim)

    @property
    def bytes_per_page(self) -> int:
        """Bytes of one page across all layers, scales included (what one page of one shard costs)."""
        return self.layers * self.page_rows * 2 * self.kv_heads * self.head_dim * jnp.dtype(self.dtype).itemsize

    @property
    def bytes_per_token(self) -> float:
        """KV bytes one cached token costs across all layers and KV heads, scales included."""
        return self.bytes_per_page / self.page_size

    @property
    def total_bytes(self) -> int:
        return self.bytes_per_page * self.data_shards * self.pages_per_shard


def model_cache_shape(config, kv_heads: int, data: int, pages_per_shard: int, page_size: int, dtype: str) -> CacheShape:
    """The cache of a model (`ModelConfig`, physical KV heads of its layout) in storage `dtype`."""
    return CacheShape(config.num_layers, data, pages_per_shard, page_size, kv_heads, config.head_dim, dtype)


def cache_sharding(mesh, shape: CacheShape, layer_loop: str = "scan"):
    """Sharding of the stacked cache (`scan`), or a tuple with one sharding per layer's array (`unrolled`)."""
    if layer_loop == "unrolled":
        return (logical_sharding(mesh, CACHE_AXES[1:], shape.shape[1:]),) * shape.layers
    return logical_sharding(mesh, CACHE_AXES, shape.shape)


def abstract_cache(mesh, shape: CacheShape, layer_loop: str = "scan"):
    """The cache as sharded `jax.ShapeDtypeStruct`s (one array, or a tuple of per-layer arrays)."""
    sharding = cache_sharding(mesh, shape, layer_loop)
    if layer_loop == "unrolled":
        return tuple(jax.ShapeDtypeStruct(shape.shape[1:], shape.dtype, sharding=s) for s in sharding)
    return jax.ShapeDtypeStruct(shape.shape, shape.dtype, sharding=sharding)


def allocate_cache(mesh, shape: CacheShape, layer_loop: str = "scan") -> jax.Array | tuple[jax.Array, ...]:
    """Zeroed cache created directly sharded on the mesh (no host copy); see the module docstring."""
    spec = abstract_cache(mesh, shape, layer_loop)
    return jax.jit(
        lambda: jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), spec),
        out_shardings=jax.tree.map(lambda a: a.sharding, spec),
    )()


def pages_for_budget(budget_bytes_per_device: float, shape: CacheShape, tensor: int) -> int:
    """How many pages one data shard can hold in `budget_bytes_per_device` of each device's memory (>= 0).

    A page's KV heads are split over `tensor` devices; `shape.pages_per_shard` is ignored.
    """
    return max(0, int(budget_bytes_per_device // (shape.bytes_per_page // tensor)))


def pages_for_memory_fraction(
    memory_bytes: int, fraction: float, in_use_bytes: int, shape: CacheShape, tensor: int
) -> int:
    """Pages per device (per (data, sequence) shard) when `fraction` of each device's memory may hold
    weights plus KV cache.

    `--kv-memory-fraction` means this both in the engine (memory and use measured on the device) and in
    the AOT planner (the chip's HBM and the weights' shard bytes), so the two agree on a page count.
    """
    return pages_for_budget(memory_bytes * fraction - in_use_bytes, shape, tensor)


def local_device(devices):
    """The first of `devices` this process can address (memory statistics exist only for those)."""
    import jax

    return next(d for d in devices if d.process_index == jax.process_index())


def device_memory(device) -> tuple[int, int | None]:
    """(bytes one device may use, bytes in use now or None when the runtime does not say).

    TPU and GPU runtimes report both. Host CPU devices report nothing; they share the machine's RAM,
    so each gets an equal part of it.
    """
    stats = device.memory_stats() or {}
    if stats.get("bytes_limit"):
        return int(stats["bytes_limit"]), int(stats.get("bytes_in_use", 0))
    if device.platform == "cpu":
        ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        return ram // len(jax.devices("cpu")), None
    raise ValueError(f"{device.platform} device {device.id} reports no memory size")
