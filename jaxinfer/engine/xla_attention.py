"""Ragged paged attention in plain XLA ops: the engine's CPU and GPU path (the TPU path is the Pallas
kernel in `pallas_kernels.ragged_paged_attention`; both have the same signature and semantics).

Each token attends to the keys of its own sequence in two parts, merged with one online softmax:
  1. this step's own tokens (a ragged prefill chunk, or a decode token itself), read back from the
     cache right after the step wrote them: causal tiles over the step's tokens (see `_this_step`).
     Prefill of fresh prompts is done here, in dense tiles, with no page gathers.
  2. the context cached by earlier steps: a loop over blocks of pages (about 64 keys per
     iteration) of each token's own page table, for only as many blocks as the longest cached
     context needs (a dynamic trip count: short contexts are cheap and nothing recompiles).
Steps of at most SINGLE_PASS_TOKENS tokens (decode, and short mixed steps) skip part 1: part 2 alone
reads each token's context up to and including itself (the step's K/V are already in the pages),
which costs less than the tiles' extra ops and merge when there are few tokens.
With `native=True` (CPU) neither part runs: the native kernel reads every token's context, its own
tokens included, in one pass straight from the pages.

Sequence shards (`sequence_shards` S > 1, `jaxinfer.engine.paged_attention`): `page_indices` holds only
this shard's pages (column k = page k * S + s of the sequence), so its keys are a subsequence of each
sequence's positions, in order; a token sees the prefix of them below its own position, which part 2 reads
as it reads any context (part 1 does not run). `return_lse` gives the partial result and its log-sum-exp
for the exact merge across shards.

Quantized caches (int8 pages with their scale trailer, fp8 pages; `pallas_kernels.ragged_paged_attention.
quantized`) are dequantized to float32 as they are gathered; per-tensor `k_scale` multiplies the
queries and `v_scale` the output, which is the same as scaling every K and V.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels.ragged_paged_attention.quantized import dequantize_pages, is_int8, page_size_of, token_scales
from pallas_kernels.ragged_paged_attention.validate import validate_static

KEYS_PER_ITERATION = 64  # cached keys gathered per loop iteration (part 2); measured best on CPU
QUERY_BLOCK = 32  # query and key tokens per tile of part 1 (measured best on CPU for mixed chunk sizes)
SINGLE_PASS_TOKENS = 64  # steps of at most this many tokens (decode) skip part 1: see the module docstring


def xla_ragged_paged_attention(
    queries,
    kv_pages,
    kv_lens,
    page_indices,
    cu_q_lens,
    num_seqs,
    *,
    sm_scale,
    native: bool = False,
    k_scale: float | None = None,
    v_scale: float | None = None,
    sequence_shards: int = 1,
    sequence_index=None,
    return_lse: bool = False,
):
    """queries [T, Hq, D]; kv_pages [P, rows, 2Hk, D] (K, V interleaved on the head axis, this step's
    K/V already written; rows = page size, plus the scale trailer of int8 pages); kv_lens [S] (cached
    tokens per sequence after this step); page_indices [S, W]; cu_q_lens [S + 1]; num_seqs [1]. Returns
    [T, Hq, D]; rows past cu_q_lens[num_seqs] are zero.

    native: every step is one pass of the native CPU kernel (`jaxinfer.native.paged_context`) over
    each token's pages, its own tokens included: on CPU it beats both XLA parts at every step shape
    measured (32 prompts x 32 tokens 2.9x, one 1024-token prompt 1.9x, decode 1.9-2.9x).

    sequence_shards / sequence_index (i32 [1], may be traced): this shard's part of each sequence's keys
    (see the module docstring). return_lse: returns (out float32 [T, Hq, D] normalised over the keys seen
    here, lse float32 [T, Hq]: log of the sum of exp(score) over them, -inf where there are none)."""
    validate_static(queries, kv_pages, kv_lens, page_indices, cu_q_lens, num_seqs, k_scale=k_scale, v_scale=v_scale)
    t, hq, dh = queries.shape
    s, width = page_indices.shape
    page = page_size_of(kv_pages)
    hk = kv_pages.shape[2] // 2
    tok = jnp.arange(t)
    seq = jnp.clip(jnp.searchsorted(cu_q_lens, tok, side="right") - 1, 0, s - 1)  # [T]
    live = tok < cu_q_lens[num_seqs[0]]
    start = kv_lens[seq] - (cu_q_lens[seq + 1] - cu_q_lens[seq])  # tokens cached before this step
    pos = jnp.where(live, start + tok - cu_q_lens[seq], -1)  # absolute position; -1 = padding
    q = queries.reshape(t, hk, hq // hk, dh).astype(jnp.float32) * (sm_scale * (k_scale or 1.0))
    seen = jnp.where(live, pos + 1, 0)  # keys each token sees: its positions 0 .. pos
    if sequence_shards > 1:  # ... of which this shard holds every S-th page, from page s on
        s_index = jnp.zeros((), jnp.int32) if sequence_index is None else sequence_index.reshape(())
        cycle = sequence_shards * page
        seen = seen // cycle * page + jnp.clip(seen % cycle - s_index * page, 0, page)

    if native:
        from jaxinfer import native as native_kernels

        carry = native_kernels.paged_context(q, kv_pages, page_indices, seq, seen, page)
    elif t <= SINGLE_PASS_TOKENS or sequence_shards > 1:  # this step's K/V are in the cache: read them with the rest
        carry = _cached_context(q, kv_pages, page_indices, seq, seen, _empty(q.shape))
    else:
        safe = jnp.maximum(pos, 0)
        own = _read_tokens(kv_pages, page_indices[seq, safe // page], safe % page, page)  # [T, 2Hk, D]
        own = jnp.where(live[:, None, None], own, 0.0)  # padding rows read whatever a page held: keep it out of p @ v
        carry = _this_step(q, own[:, 0::2], own[:, 1::2], seq, pos, cu_q_lens[seq])
        carry = _cached_context(q, kv_pages, page_indices, seq, jnp.where(live, start, 0), carry)
    m, l, acc = carry
    some = live[:, None, None] & (l > 0)
    out = jnp.where(some[..., None], acc / jnp.where(some, l, 1.0)[..., None], 0.0) * (v_scale or 1.0)
    if return_lse:
        lse = jnp.where(some, m + jnp.log(jnp.where(some, l, 1.0)), -jnp.inf)
        return out.reshape(t, hq, dh), lse.reshape(t, hq)
    return out.reshape(t, hq, dh).astype(queries.dtype)


def _read_tokens(kv_pages, page_ids, offsets, page):
    """float32 [T, 2Hk, D]: the cached K/V of one token each (page_ids, offsets [T]), dequantized."""
    kv = kv_pages[page_ids, offsets].astype(jnp.float32)
    if is_int8(kv_pages.dtype):
        kv = kv * token_scales(kv_pages, page_ids, offsets, page)[..., None]
    return kv


def _softmax_part(scores, visible, v, spec):
    """Masked scores -> (max, sum, weighted values) of one part; fully masked rows give (-inf, 0, 0)."""
    scores = jnp.where(visible, scores, -jnp.inf)
    m = scores.max(axis=-1)
    p = jnp.exp(scores - jnp.where(jnp.isneginf(m), 0.0, m)[..., None])
    return m, p.sum(axis=-1), jnp.einsum(spec, p, v)


def _merge(a, b):
    (ma, la, acca), (mb, lb, accb) = a, b
    m = jnp.maximum(ma, mb)
    shift = jnp.where(jnp.isneginf(m), 0.0, m)
    sa, sb = jnp.exp(ma - shift), jnp.exp(mb - shift)
    return m, la * sa + lb * sb, acca * sa[..., None] + accb * sb[..., None]


def _empty(shape):
    """The online-softmax carry of no keys yet for queries of `shape` [..., D]."""
    return (jnp.full(shape[:-1], -jnp.inf), jnp.zeros(shape[:-1]), jnp.zeros(shape))


def _this_step(q, k, v, seq, pos, first):
    """Part 1: token i sees token j of the step iff same sequence and pos[j] <= pos[i] (both live).

    Flash-style tiles of QUERY_BLOCK x QUERY_BLOCK tokens, batched over all query blocks at once:
    trip o pairs every query block j with key block j - o. Trip 0 (the diagonal) always runs; trips
    1.. run only as far as the longest reach back to a sequence start (`first`: step index of each
    token's sequence start), so a step of many short sequences costs one batched diagonal, and one
    long chunk one batched trip per block it spans (about twice the triangle's tiles, in few ops).
    """
    t, hk, g, dh = q.shape
    b = min(t, QUERY_BLOCK)
    n = -(-t // b)
    pad = n * b - t
    padded = lambda a, fill=0: jnp.pad(a, [(0, pad)] + [(0, 0)] * (a.ndim - 1), constant_values=fill)  # noqa: E731
    qb = padded(q).reshape(n, b, hk, g, dh)
    seqb, posb = padded(seq, -1).reshape(n, b), padded(pos, -1).reshape(n, b)
    # keys of block j - o for query block j: a slice of keys preceded by n blocks of padding
    ahead = (
        lambda a, fill: jnp.pad(
            a,
            [(n * b, pad)] + [(0, 0)] * (a.ndim - 1),  # noqa: E731
            constant_values=fill,
        ).reshape((2 * n, b) + a.shape[1:])
    )
    kp, vp, seqp, posp = ahead(k, 0), ahead(v, 0), ahead(seq, -1), ahead(pos, -1)

    def trip(o, carry):
        key = lambda a: jax.lax.dynamic_slice_in_dim(a, n - o, n, axis=0)  # noqa: E731
        kseq, kpos = key(seqp), key(posp)
        visible = (
            (kseq[:, None, :] == seqb[:, :, None]) & (kpos[:, None, :] <= posb[:, :, None]) & (kpos[:, None, :] >= 0)
        )  # [n, b, c]
        scores = jnp.einsum("nbhgd,nchd->nbhgc", qb, key(kp))
        return _merge(carry, _softmax_part(scores, visible[:, :, None, None, :], key(vp), "nbhgc,nchd->nbhgd"))

    blocks = jnp.arange(n)
    reach = jnp.where(posb[:, 0] >= 0, blocks - padded(first).reshape(n, b)[:, 0] // b, 0)
    carry = trip(0, _empty(qb.shape))
    carry = jax.lax.fori_loop(1, jnp.max(reach) + 1, trip, carry)
    return jax.tree.map(lambda a: a.reshape((n * b,) + a.shape[2:])[:t], carry)


def _cached_context(q, kv_pages, page_indices, seq, start, carry):
    """Part 2: token i sees positions [0, start[i]) of its sequence, gathered block by block."""
    t = q.shape[0]
    width = page_indices.shape[1]
    page = page_size_of(kv_pages)
    per_block = max(1, min(width, KEYS_PER_ITERATION // page))  # pages per iteration
    blocks = -(-width // per_block)
    # one spare block: a slice that is never the whole table is never loop-invariant, so XLA cannot
    # hoist the gather out of the loop (and run it even when the loop runs zero times)
    table = jnp.pad(page_indices, ((0, 0), (0, (blocks + 1) * per_block - width)))
    keys = per_block * page

    def body(i, carry):
        idx = jax.lax.dynamic_slice_in_dim(table, i * per_block, per_block, axis=1)[seq]  # [T, pages]
        kv = dequantize_pages(kv_pages[idx]).reshape(t, keys, kv_pages.shape[2], kv_pages.shape[3])
        k, v = kv[:, :, 0::2], kv[:, :, 1::2]  # [T, K, Hk, D]
        visible = (i * keys + jnp.arange(keys))[None, :] < start[:, None]  # [T, K]
        v = jnp.where(visible[:, :, None, None], v, 0.0)  # keep garbage in partly used pages out of the sum
        scores = jnp.einsum("thgd,tkhd->thgk", q, k)
        return _merge(carry, _softmax_part(scores, visible[:, None, None, :], v, "thgk,tkhd->thgd"))

    trips = (jnp.max(start) + keys - 1) // keys
    return jax.lax.fori_loop(0, trips, body, carry)
