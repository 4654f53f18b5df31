"""Plain-JAX reference for ragged paged attention (the oracle the Pallas kernel is tested against).

Semantics follow `jax.experimental.pallas.ops.tpu.ragged_paged_attention`:

* ``queries``      [max_num_batched_tokens, num_q_heads, head_dim]: the new tokens of all
  sequences, concatenated; sequence i owns rows ``cu_q_lens[i]:cu_q_lens[i+1]``.
* ``kv_pages``     [total_pages, page_size, 2 * num_kv_heads, head_dim]: the paged cache with
  K and V interleaved on the combined head axis: index ``2*h`` is K of kv head h, ``2*h+1`` V.
* ``kv_lens``      int32 [max_num_seqs]: tokens in the cache per sequence, the new ones included.
* ``page_indices`` int32 [max_num_seqs, pages_per_seq]: the page table; page ``p`` of
  sequence i holds positions ``p*page_size .. (p+1)*page_size-1``.
* ``cu_q_lens``    int32 [max_num_seqs + 1]: cumulative query lengths.
* ``num_seqs``     int32 [1]: how many leading entries of the above are live.

Query token j of sequence i (q_len = cu_q_lens[i+1] - cu_q_lens[i]) sits at absolute
position ``kv_lens[i] - q_len + j`` and attends to kv positions ``<=`` that (and, with a
sliding window w, ``> position - w``). GQA: q head ``n`` reads kv head ``n // (Hq // Hk)``.
Scores are ``sm_scale * q.k``, then ``soft_cap * tanh(s / soft_cap)`` if soft_cap is set,
then masked and softmaxed. Rows past ``cu_q_lens[num_seqs]`` are padding; here they are 0.

Quantized caches (`quantized`): int8 pages carry per-(token, kv-head) scales in a trailer after the
page's tokens; fp8 pages are plain values. Either may also have per-tensor ``k_scale`` / ``v_scale``
(K is read as k * k_scale, V as v * v_scale, as in JAX's kernel). The reference dequantizes the whole
cache to float32 first (`quantized.dequantize_pages`) and then runs the float computation below.

Written to be obviously right rather than fast: every token independently finds its
sequence by counting, gathers that sequence's whole page list, and runs a dense masked
softmax in float32. It is jittable (no data-dependent Python control flow), and its cost
(each token gathers its sequence's full KV) is what the kernel exists to avoid.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from pallas_kernels.ragged_paged_attention.quantized import dequantize_pages
from pallas_kernels.ragged_paged_attention.validate import validate_static

_HI = jax.lax.Precision.HIGHEST


# Jitted: one compile per shape. Run op by op (eagerly, under the vmap) it dispatches and compiles
# every small op on its own, which costs seconds per new shape.
@functools.partial(
    jax.jit,
    static_argnames=("sm_scale", "sliding_window", "soft_cap", "k_scale", "v_scale", "sequence_shards", "return_lse"),
)
def ragged_paged_attention_reference(
    queries,  # [T, Hq, D]
    kv_pages,  # [P, page_size, 2*Hk, D]
    kv_lens,  # i32[S]
    page_indices,  # i32[S, pages_per_seq]
    cu_q_lens,  # i32[S+1]
    num_seqs,  # i32[1]
    *,
    sm_scale: float = 1.0,
    sliding_window: int | None = None,
    soft_cap: float | None = None,
    k_scale: float | None = None,
    v_scale: float | None = None,
    sequence_shards: int = 1,
    sequence_index=None,
    return_lse: bool = False,
):
    """Dense per-token reference; returns [T, Hq, D] in ``queries.dtype``.

    Sequence shards (S = ``sequence_shards`` > 1, shard s = ``sequence_index[0]``, 0 when None): the pages
    hold only that shard's keys of each sequence, local key x being absolute position
    ``((x // page_size) * S + s) * page_size + x % page_size``; kv_lens and the queries are global.
    ``return_lse``: returns (out float32 normalised over the keys seen, lse float32 [T, Hq] = log sum
    exp(score) over them); a row that sees none (padding included) gives 0 and -inf."""
    validate_static(
        queries,
        kv_pages,
        kv_lens,
        page_indices,
        cu_q_lens,
        num_seqs,
        sliding_window=sliding_window,
        soft_cap=soft_cap,
        k_scale=k_scale,
        v_scale=v_scale,
        sequence_shards=sequence_shards,
        sequence_index=sequence_index,
    )
    kv_pages = dequantize_pages(kv_pages, k_scale, v_scale)  # float32 [P, page_size, 2Hk, D]
    T, Hq, D = queries.shape
    _, page_size, C, _ = kv_pages.shape
    Hk = C // 2
    G = Hq // Hk
    S, pages_per_seq = page_indices.shape
    L = pages_per_seq * page_size  # longest sequence the page table can describe
    n = num_seqs[0]

    live = jnp.arange(S) < n
    seq_ends = jnp.where(live, cu_q_lens[1:], jnp.iinfo(jnp.int32).max)  # [S]

    def one_token(t, q):  # q: [Hq, D]
        seq = jnp.minimum(jnp.sum(seq_ends <= t), S - 1)  # the i with cu[i] <= t < cu[i+1]
        q_start = cu_q_lens[seq]
        q_len = cu_q_lens[seq + 1] - q_start
        pos = kv_lens[seq] - q_len + (t - q_start)  # absolute position of this token
        kv = kv_pages[page_indices[seq]].reshape(L, C, D).astype(jnp.float32)  # [L, 2Hk, D]
        k, v = kv[:, 0::2], kv[:, 1::2]  # [L, Hk, D] each
        kv_pos = jnp.arange(L)
        if sequence_shards > 1:  # absolute positions of this shard's local keys
            shard = 0 if sequence_index is None else sequence_index[0]
            kv_pos = ((kv_pos // page_size) * sequence_shards + shard) * page_size + kv_pos % page_size
        ok = kv_pos <= pos  # causal (pos < kv_len, so this also bounds by kv_len)
        if sliding_window is not None:
            ok &= kv_pos > pos - sliding_window
        qg = q.astype(jnp.float32).reshape(Hk, G, D)
        s = jnp.einsum("hgd,lhd->hgl", qg, k, precision=_HI) * sm_scale
        if soft_cap is not None:
            s = soft_cap * jnp.tanh(s / soft_cap)
        s = jnp.where(ok, s, -jnp.inf)
        p = jax.nn.softmax(s, axis=-1)
        v = jnp.where(ok[:, None, None], v, 0.0)  # unused slots may hold NaN garbage
        o = jnp.einsum("hgl,lhd->hgd", p, v, precision=_HI).reshape(Hq, D)
        row = (t < cu_q_lens[n]) & jnp.any(ok)  # a shard may hold none of a token's keys: softmax is NaN there
        lse = jnp.where(row, jax.nn.logsumexp(s, axis=-1).reshape(Hq), -jnp.inf)
        return jnp.where(row, o, 0.0), lse

    out, lse = jax.vmap(one_token)(jnp.arange(T), queries)
    return (out, lse) if return_lse else out.astype(queries.dtype)
