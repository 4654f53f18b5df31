"""Quantized KV pages: the int8 page format (values plus per-(token, kv-head) scales in the page) and
fp8 pages (values only, optionally with per-tensor k/v scales).

int8 pages are [P, page_size + E, 2*Hk, D] int8. Rows 0..page_size-1 hold the page's tokens as the float
pages do (combined head 2h is K of kv head h, 2h+1 its V); the vector x of one (token, combined head) is
stored as round(x / s), s = max|x| / 127 (symmetric; a zero vector has s = 0). The E =
ceil(4 * page_size / D) trailing rows ("the trailer") hold the scales s as float32 bit patterns, each
combined head in its own row(s): byte b (least significant first) of token t's scale sits at flat
position f = 4 * t + b of its head's trailer, i.e. row page_size + f // D, lane f % D (D a multiple of
4, so a token's four bytes share one row: writing a token's scales is one [2Hk, 4] window per token,
a scatter XLA does in place, where four single bytes per head made XLA:TPU copy the whole cache into
another layout for an element scatter).

Why in the page: one page is still one contiguous [page_size + E, 2Hk, D] block, so the cache stays one
array per layer (same sharding, donation and page tables as the float cache) and the Pallas kernel
fetches values and scales with the one DMA per page it already issues. The scales cost E / page_size
(1/16 at page 16) of the int8 bytes, the bytes of a float32 scale per (token, kv head) when 4 * page_size
is a multiple of D. A separate scales array would need its own per-page DMA of a few dozen bytes, and
TPU layouts of such small arrays either pad them or keep the page index minor (see the README).

fp8 pages (float8_e4m3fn, float8_e5m2) are [P, page_size, 2Hk, D] like float pages; with a per-tensor
`k_scale` / `v_scale` (static floats, as JAX's own ragged kernel takes them) the stored value is x / scale,
saturated to the format's largest finite value, and attention multiplies it back.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

INT8_MAX = 127
FP8_DTYPES = (jnp.dtype(jnp.float8_e4m3fn), jnp.dtype(jnp.float8_e5m2))
FLOAT_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16))
KV_DTYPES = FLOAT_DTYPES + (jnp.dtype(jnp.int8),) + FP8_DTYPES  # what the attention paths read


def is_int8(dtype) -> bool:
    return jnp.dtype(dtype) == jnp.int8


def scale_rows(page_size: int, head_dim: int) -> int:
    """E: trailer rows of an int8 page (4 bytes per token of each combined head, D bytes per row)."""
    return -(-4 * page_size // head_dim)


def page_rows(page_size: int, head_dim: int, dtype) -> int:
    """Rows of one page of `dtype` in the cache: the tokens, plus the trailer for int8."""
    return page_size + (scale_rows(page_size, head_dim) if is_int8(dtype) else 0)


def page_size_of(kv_pages) -> int:
    """Tokens per page of a cache array [..., P, rows, 2Hk, D] (rows = page_size + E for int8)."""
    rows, d = kv_pages.shape[-3], kv_pages.shape[-1]
    if not is_int8(kv_pages.dtype):
        return rows
    for page in range(rows, 0, -1):  # rows = page + ceil(4 page / D) grows with page: one solution at most
        if page + scale_rows(page, d) == rows:
            return page
        if page + scale_rows(page, d) < rows:
            break
    raise ValueError(f"int8 kv_pages {kv_pages.shape}: {rows} rows per page is no page_size + ceil(4*page_size/{d})")


def quantize_int8(x):
    """x [..., D] float -> (int8 values [..., D], float32 scales [...]): symmetric, one scale per vector."""
    x = x.astype(jnp.float32)
    scale = jnp.max(jnp.abs(x), axis=-1) / INT8_MAX
    safe = jnp.where(scale > 0, scale, 1.0)[..., None]
    q = jnp.clip(jnp.round(x / safe), -INT8_MAX, INT8_MAX).astype(jnp.int8)
    return q, scale


def to_fp8(x, dtype, scale: float | None = None):
    """x float -> fp8 `dtype` of x / scale, saturated (e4m3fn has no infinity: out of range would be NaN)."""
    x = x.astype(jnp.float32) if scale is None else x.astype(jnp.float32) / scale
    top = float(jnp.finfo(dtype).max)
    return jnp.clip(x, -top, top).astype(dtype)


def _scale_bytes(scale):
    """float32 [...] -> int8 [..., 4]: the bit pattern's bytes, least significant first."""
    bits = jax.lax.bitcast_convert_type(scale.astype(jnp.float32), jnp.uint32)
    parts = [((bits >> (8 * b)) & 0xFF).astype(jnp.uint8) for b in range(4)]
    return jax.lax.bitcast_convert_type(jnp.stack(parts, axis=-1), jnp.int8)


def _from_bytes(parts):
    """int8 [..., 4] (least significant byte first) -> the float32 with that bit pattern [...]."""
    parts = parts.astype(jnp.uint32) & 0xFF
    bits = parts[..., 0] | (parts[..., 1] << 8) | (parts[..., 2] << 16) | (parts[..., 3] << 24)
    return jax.lax.bitcast_convert_type(bits, jnp.float32)


def token_scales(pages, page_ids, offsets, page_size: int):
    """int8 pages [P, rows, C, D]; page_ids, offsets [T] -> float32 [T, C]: the scales of T tokens."""
    d = pages.shape[-1]
    flat = 4 * offsets[:, None] + jnp.arange(4)[None, :]  # [T, 4] trailer positions of the bytes
    parts = pages[page_ids[:, None], page_size + flat // d, :, flat % d]  # [T, 4, C]
    return _from_bytes(jnp.moveaxis(parts, 1, -1))


def unpack_scales(trailer, page_size: int):
    """trailer int8 [..., E, C, D] -> float32 scales [..., page_size, C] (see the module docstring)."""
    *lead, e, c, d = trailer.shape
    flat = jnp.moveaxis(trailer, -2, -3).reshape(*lead, c, e * d)[..., : 4 * page_size]  # [..., C, 4 * page]
    return jnp.swapaxes(_from_bytes(flat.reshape(*lead, c, page_size, 4)), -1, -2)  # [..., page, C]


def dequantize_pages(pages, k_scale: float | None = None, v_scale: float | None = None):
    """Cache pages [..., rows, C, D] of any KV dtype -> float32 [..., page_size, C, D], scales applied."""
    if is_int8(pages.dtype):
        page = page_size_of(pages)
        out = pages[..., :page, :, :].astype(jnp.float32) * unpack_scales(pages[..., page:, :, :], page)[..., None]
    else:
        out = pages.astype(jnp.float32)
    if k_scale is not None or v_scale is not None:
        per_head = jnp.tile(jnp.array([k_scale or 1.0, v_scale or 1.0], jnp.float32), out.shape[-2] // 2)
        out = out * per_head[:, None]
    return out


def write_tokens(pages, page_ids, offsets, kv, *, prefix=(), k_scale=None, v_scale=None):
    """Stores the K/V of T tokens into cache pages, quantizing on write; returns the updated pages.

    pages [..., P, rows, C, D] (`prefix` indexes the leading axes, e.g. (layer,) of a stacked cache);
    page_ids, offsets i32 [T] (a page id out of range drops the token); kv [T, C, D] float, K and V
    interleaved on C like the pages. fp8 stores kv / k_scale (K) and kv / v_scale (V).
    """
    dtype = pages.dtype
    n_pages, page = pages.shape[-4], page_size_of(pages)
    page_ids = jnp.where((offsets >= 0) & (offsets < page), page_ids, n_pages)  # never into the trailer
    if jnp.dtype(dtype) in FP8_DTYPES:
        k = to_fp8(kv[:, 0::2], dtype, k_scale)
        v = to_fp8(kv[:, 1::2], dtype, v_scale)
        values = jnp.stack([k, v], axis=2).reshape(kv.shape)
    elif is_int8(dtype):
        values, scale = quantize_int8(kv)  # [T, C, D], [T, C]
        pages = _write_scales(pages, prefix, page_ids, offsets, page, _scale_bytes(scale))
    else:
        values = kv.astype(dtype)
    return pages.at[prefix + (page_ids, offsets)].set(values, mode="drop")


def _write_scales(pages, prefix, page_ids, offsets, page_size: int, scale_bytes):
    """Writes each token's [C, 4] scale bytes as one window at (prefix..., page, trailer row, all heads,
    lanes 4t .. 4t + 3); a page id out of range drops the window."""
    d, nd = pages.shape[-1], pages.ndim
    flat = 4 * offsets  # the token's byte 0 in its heads' trailers
    lead = [jnp.broadcast_to(jnp.asarray(i, jnp.int32), page_ids.shape) for i in prefix]
    at = jnp.stack(lead + [page_ids, page_size + flat // d, flat % d], axis=-1)  # [T, len(prefix) + 3]
    dims = jax.lax.ScatterDimensionNumbers(
        update_window_dims=(1, 2),  # updates [T, C, 4]: a window over (heads, lanes)
        inserted_window_dims=tuple(range(nd - 2)),  # the leading axes, pages and rows: one index each
        scatter_dims_to_operand_dims=tuple(range(nd - 2)) + (nd - 1,),  # ..., page, row, first lane
    )
    return jax.lax.scatter(pages, at, scale_bytes, dims, mode=jax.lax.GatherScatterMode.FILL_OR_DROP)
