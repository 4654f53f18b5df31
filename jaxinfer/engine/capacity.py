"""How many KV pages each data shard gets: from --kv-pages, --kv-memory-fraction, or enough for every slot."""

from __future__ import annotations

import dataclasses

from jaxinfer.config import ConfigError
from jaxinfer.engine.pages import pages_needed
from jaxinfer.kv_cache import CacheShape, device_memory, local_device, model_cache_shape, pages_for_memory_fraction
from jaxinfer.sharding import per_device_bytes


def request_pages_per_shard(max_context: int, page_size: int, sequence: int = 1) -> int:
    """Pages of each sequence shard one request of `max_context` tokens can need (its pages are dealt
    round-robin over the `sequence` shards)."""
    return -(-pages_needed(max_context, page_size) // sequence)


def page_table_width(max_context: int, page_size: int, sequence: int = 1) -> int:
    """Columns of a slot's page table: the pages of --max-context, rounded up so that each sequence shard
    gets as many (shard s reads columns s, s + S, ...)."""
    return request_pages_per_shard(max_context, page_size, sequence) * sequence


def resolve_pages(
    config, model, one_page: CacheShape, pages_per_slot: int, data: int, other_bytes: int = 0, sequence: int = 1
) -> int:
    """Pages per (data, sequence) shard, i.e. per device's share of the cache. `one_page`: the bytes of one
    page of every cache (the draft's included); `other_bytes`: device bytes besides the target's weights
    already placed (a draft's weights). A request's pages are dealt over the `sequence` shards, so it needs
    ceil(pages_per_slot / sequence) of each shard's."""
    c, m = config, model
    per_shard = -(-pages_per_slot // sequence)
    spread = f" (its {pages_per_slot} pages over {sequence} sequence shards)" if sequence > 1 else ""
    if c.kv_pages is not None:
        if c.kv_pages < per_shard:
            raise ConfigError(
                f"--kv-pages {c.kv_pages} is below the {per_shard} pages per shard one "
                f"request of --max-context {c.max_context} needs{spread}"
            )
        return c.kv_pages
    if c.kv_memory_fraction is None:
        return (c.max_slots // data) * per_shard
    try:
        limit, in_use = device_memory(local_device(m.mesh.devices.flat))
    except ValueError as e:
        raise ConfigError(f"--kv-memory-fraction: {e}; use --kv-pages instead") from None
    if in_use is None:  # host devices: what this engine put there so far is its weights
        in_use = per_device_bytes(m.params) + other_bytes
    pages = pages_for_memory_fraction(limit, c.kv_memory_fraction, in_use, one_page, m.mesh.shape["tensor"])
    if pages < per_shard:
        raise ConfigError(
            f"--kv-memory-fraction {c.kv_memory_fraction} leaves room for {pages} pages per shard, "
            f"below the {per_shard} one request needs{spread}"
        )
    return pages


def page_shapes(model, draft, data: int, page_size: int, dtype: str):
    """-> (one page per shard of the target's cache, of the draft's or None, of both together: the
    target's shape with the draft's bytes as extra layers, rounded up, for sizing by memory). `dtype`:
    the caches' storage dtype (`EngineConfig.cache_dtype`)."""
    one = model_cache_shape(model.config, model.layout.kv_heads, data, 1, page_size, dtype)
    if draft is None or draft.config.feature_head:  # a feature head keeps no cache
        return one, None, one
    other = model_cache_shape(draft.config, draft.layout.kv_heads, data, 1, page_size, dtype)
    per_layer = one.bytes_per_page // one.layers
    return one, other, dataclasses.replace(one, layers=one.layers + -(-other.bytes_per_page // per_layer))
