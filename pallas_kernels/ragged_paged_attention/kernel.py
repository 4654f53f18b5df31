"""Ragged paged attention as a Pallas TPU (Mosaic) kernel: decode, prefill chunks and mixes.

Same inputs and semantics as `reference.ragged_paged_attention_reference` (and JAX's
`jax.experimental.pallas.ops.tpu.ragged_paged_attention`): queries [T, Hq, D] of all
sequences concatenated (``cu_q_lens``), a paged KV cache [P, page_size, 2*Hk, D] with K at
combined head ``2h`` and V at ``2h+1``, per-sequence ``kv_lens`` and page table.

The new step's K/V are NOT written here: the engine writes them into ``kv_pages`` with a
fused XLA scatter right before this kernel runs, so the kernel only ever reads the cache.

Design
------
* Layout. The wrapper regroups queries head-major, [T, Hq, D] -> [Hk, T*G, D] (G = Hq/Hk,
  row ``t*G + g``), so the G query heads that share a kv head are one dense [rows, D]
  matrix: GQA becomes one MXU matmul per kv head and no in-kernel relayout is needed.
  Output comes back in the same layout and is regrouped to [T, Hq, D].
* Grid ``(kv_head_blocks, q_blocks)``. A q block is ``Bq`` consecutive tokens of the flat
  token axis (Bq*G rows), which may span several sequences (decode: up to Bq of them; a
  prefill chunk: several blocks per sequence). The wrapper precomputes, per q block, the
  range of sequences that overlap it (``seq_lo``/``seq_hi``, scalar-prefetched into SMEM
  with kv_lens, the flattened page table and cu_q_lens).
* Inside a grid step the kernel walks the work list (sequence, kv block) of its q block:
  for each overlapping sequence, the kv blocks (``Bk = pages_per_block * page_size``
  tokens) between the sliding-window start and the last causally visible position of the
  block's rows. Blocks that are fully masked are never fetched or computed.
* DMA. kv_pages stays in HBM (``memory_space=ANY``). Each kv block is gathered page by
  page with `pltpu.make_async_copy` into one of two VMEM slots; the copy of work item
  i+1 is started before item i is waited for and computed (double buffering). Only pages
  that hold visible positions are copied (the rest of the slot keeps stale data, which the
  masks below neutralise). Each grid step runs its own prefetch chain, so grid steps are
  independent and both grid axes are declared "parallel" (megacore chips can split them);
  the cost is one exposed page-block fetch per grid step.
* Math. Online softmax (flash style) with running max ``m``, sum ``l`` (lane-replicated
  [rows, 128] f32) and accumulator [rows, D] f32 in VMEM scratch; normalisation once at
  the end of the step. One mask per (row, column) covers "row belongs to this sequence",
  causality (which also bounds by kv_len) and the sliding window; masked scores get a
  large finite negative and probabilities are forced to exactly 0, so rows of other
  sequences are left bit-for-bit untouched. V rows outside the visible range are zeroed
  before P@V, so NaN/garbage in unused cache slots or never-fetched VMEM cannot leak.
  K and V of kv head h are read out of the combined-head slot with sublane-strided loads.

* Sequence shards (``sequence_shards`` S > 1; issue #21, `jaxinfer.engine.paged_attention`). The cache
  and page table hold only shard s's pages of each sequence, dealt round-robin: column k of a row is the
  sequence's page k*S + s, so local key x is absolute position ``((x // page) * S + s) * page + x % page``.
  kv_lens, cu_q_lens and the queries stay global. s (``sequence_index``, traced inside shard_map) is one
  more scalar-prefetch input. The position is monotonic in x, so each row's visible keys are still one
  contiguous local range: ``info`` converts the block's absolute bounds (window start, last position)
  into local ones by counting this shard's keys below them (scalar math), and the walk, DMAs and V mask
  run on local indices as before. Only the score mask needs absolute positions: a [1, Bk] row built from
  an iota plus (S-1)*page per page boundary passed (selects, no vector division), broadcast over the
  rows. A q block may see no key of this shard at all (a sequence shorter than S pages; early tokens of
  a prefill): its work list is empty. With ``return_lse`` the output is float32 and a second output
  holds lse = m + log(l): per q block and kv head one [1, R] row (lane 0 of the lane-replicated m and
  l, transposed), an array [q_blocks, Hk, R] whose blocks are its whole last two dims, as the TPU
  block rules allow, regrouped to [T, Hq] outside. A lane-replicated [Hk, rows, 128] output would
  write 128 times the bytes (for a 512-token chunk of 8 query heads, 2 MiB per call instead of 16 KiB).
  Rows with no visible key give out 0 and lse -inf, which `merge` combines exactly. With S = 1 and
  no lse none of this is traced: the kernel is the one above (the same jaxpr as before the mode).

Block sizes (``_choose_blocks``): Bk ~ 256 tokens (pages_per_block = 256 // page_size,
shrunk so both slots stay <= 4 MiB); Bq targets 32 query rows (Bq*G) for decode-like
batches (T <= max_num_seqs) and 128 rows otherwise, rounded so rows are a multiple of the
sublane tile (8 for 32-bit, 16 for bf16). Decode rows beyond the first of each sequence
are wasted MXU work, which is why decode uses small q blocks. Both are overridable.

Quantized KV (8-bit: int8 pages with their per-(token, kv-head) scales in a trailer after the
page's tokens, see `quantized`; float8_e4m3fn / float8_e5m2 pages): each page is DMA'd whole
(values and trailer, one copy as before) into its own [rows, 2Hk, D] slab of the slot, and the
slot is widened to float32 once per work item. 8-bit caches keep their 4-D page view: XLA's
default TPU layout of an int8 [P, rows, 2Hk, D] cache tiles (2Hk, D) with 4-row packing, which
Mosaic reads as is, while the merged [P, rows*2Hk, D] view made XLA copy the whole cache into
Mosaic's 32-row tiling on every call (AOT compiles for v5e with 2Hk = 4). K and V of head h are
read page by page from the f32 slabs and concatenated; their values (integers up to 127, or fp8)
are exact in bfloat16, so the MXU runs at the queries' dtype. The int8 scales multiply the
[rows, Bk] score and probability tiles, one lane per key: head c's trailer holds byte b of token
t at lane 4t + b, so four small 0/1 matmuls per trailer row gather the bytes of each token to its
own lane, ORs rebuild the float32 bits, and a lane concatenation of the pages gives the block's
[1, Bk] row. Per-tensor ``k_scale`` /
``v_scale`` (any KV dtype, as in JAX's kernel) multiply the scores and the P@V product.

Caveats (seen in AOT compiles for v5e): the wrapper views the cache as
[P, page_size*2Hk, D], which XLA makes a free bitcast for head_dim 128; for head_dim 64
XLA's default TPU layout of the 4-D cache differs and it inserts a copy of the whole
cache per call. The flattened page table lives in SMEM (max_num_seqs*pages_per_seq
int32), which bounds how large the page table can be.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.ragged_paged_attention.quantized import page_size_of
from pallas_kernels.ragged_paged_attention.validate import validate_static

_MASK = -1e30  # finite "minus infinity": keeps exp(m_prev - m_new) well defined
_LANES = 128


def _cdiv(a, b):
    return (a + b - 1) // b


def _sublane_tile(dtype) -> int:
    return 8 * (4 // jnp.dtype(dtype).itemsize)


def _choose_blocks(
    T,
    Hq,
    Hk,
    D,
    page_size,
    pages_per_seq,
    max_num_seqs,
    q_dtype,
    kv_dtype,
    num_kv_pages_per_block,
    num_queries_per_block,
    rows,
):
    """Returns (kv_pages_per_block, queries_per_block). `rows`: rows of one page (page_size, or more with
    the int8 scale trailer)."""
    G = Hq // Hk
    nb = num_kv_pages_per_block
    if nb is None:
        nb = max(1, min(pages_per_seq, 256 // page_size))
        page_bytes = rows * 2 * Hk * D * jnp.dtype(kv_dtype).itemsize
        if jnp.dtype(kv_dtype).itemsize == 1:  # plus its float32 copy (one slot)
            page_bytes += page_bytes * 4 // 2
        while nb > 1 and 2 * nb * page_bytes > 4 * 2**20:  # both slots within 4 MiB
            nb //= 2
    tile = _sublane_tile(q_dtype)
    bq = num_queries_per_block
    if bq is None:
        rows = 32 if T <= max_num_seqs else 128
        bq = pl.next_power_of_2(max(1, rows // G))
        while (bq * G) % tile:
            bq *= 2
    elif (bq * G) % tile and _cdiv(T, bq) > 1:
        raise ValueError(f"num_queries_per_block*G={bq * G} must be a multiple of {tile}")
    return nb, bq


def _kernel(
    kv_lens_ref,
    pages_ref,
    cu_ref,
    seq_lo_ref,
    seq_hi_ref,  # SMEM (prefetched)
    *refs,
    G,
    bq,
    nb,
    page_size,
    pages_per_seq,
    sm_scale,
    sliding_window,
    soft_cap,
    k_scale,
    v_scale,
    trailer,
    shards,
    with_lse,
):
    # refs: [shard_ref (SMEM i32[1], sequence shards only)], q_ref [Hk, R, D] (R = Bq*G query rows of this
    # block), kv_hbm (HBM [P, page_size*2*Hk, D], row = token*2Hk + combined head; 8-bit: [P, rows, 2*Hk, D]),
    # o_ref [Hk, R, D], [lse_ref [1, Hk, R] f32 (return_lse only)], kv_buf (VMEM [2, nb*page_size*2*Hk, D]:
    # two slots of nb pages; 8-bit: [2, nb, rows, 2*Hk, D]), sem (DMA semaphores [2]), m_ref, l_ref (VMEM
    # [Hk, R, 128] f32), acc_ref (VMEM [Hk, R, D] f32), *scratch (16-bit KV: VMEM u32 [nb*page_size*Hk, D]
    # (K/V pairs); 8-bit: VMEM f32 [nb, rows, 2Hk, D]).
    if shards > 1:
        shard_ref, *refs = refs
    q_ref, kv_hbm, o_ref, *refs = refs
    if with_lse:
        lse_ref, *refs = refs
    kv_buf, sem, m_ref, l_ref, acc_ref, *scratch = refs
    Hk, R, D = q_ref.shape
    C = 2 * Hk
    bk = nb * page_size
    page_rows = page_size * C
    eight_bit = kv_buf.ndim == 5  # a slab per page: [2, nb, rows, C, D]
    qb = pl.program_id(0)
    row0 = qb * bq  # first token of this q block
    s_lo, s_hi = seq_lo_ref[qb], seq_hi_ref[qb]
    n_slots = kv_lens_ref.shape[0]

    if shards > 1:  # local key x is absolute position ((x // page) * shards + shard) * page + x % page
        cycle, shard = shards * page_size, shard_ref[0]

        def local_count(n):  # local keys at absolute positions < n (scalar, n >= 0)
            return n // cycle * page_size + jnp.clip(n % cycle - shard * page_size, 0, page_size)

        def key_pos(b, iota):  # absolute positions of local keys b*bk + iota (no vector division)
            out = iota + (b * nb * shards + shard) * page_size
            for j in range(1, nb):  # each page boundary passed skips the other shards' pages
                out = out + jnp.where(iota >= j * page_size, (shards - 1) * page_size, 0)
            return out

    def safe(s):  # clamp a maybe-past-the-end sequence index before reading SMEM with it
        return jnp.clip(s, 0, n_slots - 1)

    def info(s):
        """Scalars of sequence s as seen from this q block."""
        q_start, q_end, kv_len = cu_ref[s], cu_ref[s + 1], kv_lens_ref[s]
        delta = kv_len - q_end  # position of token t is t + delta
        t_lo, t_hi = jnp.maximum(q_start, row0), jnp.minimum(q_end, row0 + bq)
        pos_hi = t_hi - 1 + delta  # last position any row of the block sees
        lo = 0 if sliding_window is None else jnp.maximum(t_lo + delta - sliding_window + 1, 0)
        if shards > 1:  # the same bounds as local key indices (positions are monotonic in them)
            pos_hi = local_count(jnp.maximum(pos_hi + 1, 0)) - 1  # -1: no key of this shard is visible
            lo = 0 if sliding_window is None else local_count(lo)
            t_hi = jnp.where(pos_hi >= 0, t_hi, t_lo)
        b_hi = jnp.where(t_hi > t_lo, pos_hi // bk + 1, 0)
        b_lo = jnp.minimum(lo // bk, b_hi)
        return dict(q_start=q_start, q_end=q_end, delta=delta, pos_hi=pos_hi, lo=lo, b_lo=b_lo, b_hi=b_hi)

    def first_busy(s):  # first sequence >= s with work in this block, or >= s_hi
        def cond(s):
            i = info(safe(s))
            return jnp.logical_and(s < s_hi, i["b_lo"] >= i["b_hi"])

        return lax.while_loop(cond, lambda s: s + 1, s)

    def copies(s, b, slot):
        """(predicate, descriptor) per page of work item (s, b): only visible pages."""
        i = info(s)
        out = []
        for j in range(nb):
            p = b * nb + j
            need = (p * page_size <= i["pos_hi"]) & ((p + 1) * page_size > i["lo"])
            need &= p < pages_per_seq
            page = pages_ref[s * pages_per_seq + jnp.minimum(p, pages_per_seq - 1)]
            dst = kv_buf.at[slot, j] if eight_bit else kv_buf.at[slot, pl.ds(j * page_rows, page_rows)]
            out.append((need, pltpu.make_async_copy(kv_hbm.at[page], dst, sem.at[slot])))
        return out

    def start(s, b, slot):
        for need, cp in copies(s, b, slot):
            pl.when(need)(cp.start)

    def wait(s, b, slot):
        for need, cp in copies(s, b, slot):
            pl.when(need)(cp.wait)

    def load_kv(slot, h):
        """K and V of kv head h from the slot: two [bk, D] arrays (8-bit: float32 of the stored values)."""
        if eight_bit:  # the slot was widened to f32 slabs: per page, the tokens' rows of heads 2h / 2h+1
            wide = scratch[0]
            if nb == 1:
                return wide[0, :page_size, 2 * h, :], wide[0, :page_size, 2 * h + 1, :]
            k = jnp.concatenate([wide[j, :page_size, 2 * h, :] for j in range(nb)], axis=0)
            v = jnp.concatenate([wide[j, :page_size, 2 * h + 1, :] for j in range(nb)], axis=0)
            return k, v
        if not scratch:  # 32-bit: sublane-strided loads pick rows 2h (K) / 2h+1 (V)
            return (kv_buf[slot, pl.ds(2 * h, bk, stride=C), :], kv_buf[slot, pl.ds(2 * h + 1, bk, stride=C), :])
        # 16-bit: rows 2h and 2h+1 share one 32-bit sublane word (K low half, V high
        # half), so a strided 32-bit load of the packed view fetches both at once.
        w = scratch[0][pl.ds(h, bk, stride=Hk), :]  # [bk, D] u32
        k = pltpu.bitcast(w << 16, jnp.float32).astype(kv_buf.dtype)
        v = pltpu.bitcast(w & jnp.uint32(0xFFFF0000), jnp.float32).astype(kv_buf.dtype)
        return k, v

    def token_scales(c):
        """int8: the [1, bk] row of float32 scales of combined head c over the block's keys.

        Trailer row e of head c holds the bytes of tokens [e*D/4, (e+1)*D/4), byte b of token t at lane
        4t + b. One small matmul per byte with a 0/1 matrix moves lane 4t + b to lane t (exact: one
        nonzero term of at most 8 bits), then the bytes are ORed into float32 bits."""
        per_row = D // 4
        parts = [[] for _ in range(4)]  # per byte: [nb, n] pieces over the trailer rows
        for e in range(-(-page_size // per_row)):
            n = min(per_row, page_size - e * per_row)  # tokens in this row
            row = scratch[0][:, page_size + e, c, :]  # [nb, D]: bytes as -128..127
            lane = lax.broadcasted_iota(jnp.int32, (D, n), 0)
            token = lax.broadcasted_iota(jnp.int32, (D, n), 1)
            for b in range(4):
                pick = (lane == 4 * token + b).astype(jnp.float32)  # [D, n]
                parts[b].append(jnp.dot(row, pick, preferred_element_type=jnp.float32))
        word = None
        for b in range(4):
            piece = parts[b][0] if len(parts[b]) == 1 else jnp.concatenate(parts[b], axis=1)  # [nb, page]
            byte = piece.astype(jnp.int32) & 0xFF
            word = byte if word is None else word | (byte << (8 * b))
        scales = pltpu.bitcast(word, jnp.float32)  # [nb, page_size]
        return scales if nb == 1 else jnp.concatenate([scales[j : j + 1] for j in range(nb)], axis=1)

    def compute(s, b, slot):
        i = info(s)
        if eight_bit:  # widen the slot once for all heads
            scratch[0][...] = kv_buf[slot].astype(jnp.float32)
        elif scratch:  # repack the slot as u32 once for all heads
            scratch[0][...] = pltpu.bitcast(kv_buf[slot], jnp.uint32)
        if shards > 1:  # [1, bk] absolute positions of the block's local keys, broadcast over the rows
            col = key_pos(b, lax.broadcasted_iota(jnp.int32, (1, bk), 1))
        else:
            col = b * bk + lax.broadcasted_iota(jnp.int32, (R, bk), 1)
        tok = row0 + lax.broadcasted_iota(jnp.int32, (R, bk), 0) // G
        pos = tok + i["delta"]
        ok = (tok >= i["q_start"]) & (tok < i["q_end"]) & (col <= pos)
        if sliding_window is not None:
            ok &= col > pos - sliding_window
        vcol = b * bk + lax.broadcasted_iota(jnp.int32, (bk, 1), 0)
        vok = (vcol >= i["lo"]) & (vcol <= i["pos_hi"])  # exactly the fetched, used slots
        if trailer:
            vrow = b * bk + lax.broadcasted_iota(jnp.int32, (1, bk), 1)
            vok_row = (vrow >= i["lo"]) & (vrow <= i["pos_hi"])
        score_scale = sm_scale * (1.0 if k_scale is None else k_scale)
        for h in range(Hk):
            k, v = load_kv(slot, h)
            v = jnp.where(vok, v, jnp.zeros_like(v))
            if eight_bit:  # stored values are exact in the queries' dtype: the MXU runs at it
                k, v = k.astype(q_ref.dtype), v.astype(q_ref.dtype)
            sc = (
                lax.dot_general(q_ref[h], k, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32) * score_scale
            )  # [R, bk]
            if trailer:
                sc = sc * token_scales(2 * h)
            if soft_cap is not None:
                sc = soft_cap * jnp.tanh(sc / soft_cap)
            sc = jnp.where(ok, sc, _MASK)
            m_prev = m_ref[h]  # [R, 128], lanes equal
            m_new = jnp.maximum(m_prev, jnp.max(sc, axis=1, keepdims=True))
            p = jnp.where(ok, jnp.exp(sc - m_new[:, :1]), 0.0)
            alpha = jnp.exp(m_prev - m_new)
            l_ref[h] = alpha * l_ref[h] + jnp.sum(p, axis=1, keepdims=True)
            m_ref[h] = m_new
            if trailer:  # scales of unused slots may be anything (NaN): zero them, not just p
                p = p * jnp.where(vok_row, token_scales(2 * h + 1), 0.0)
            pv = jnp.dot(p.astype(v.dtype), v, preferred_element_type=jnp.float32)
            if v_scale is not None:
                pv = pv * v_scale
            acc_ref[h] = acc_ref[h] * alpha[:, :1] + pv

    m_ref[...] = jnp.full(m_ref.shape, _MASK, jnp.float32)
    l_ref[...] = jnp.zeros(l_ref.shape, jnp.float32)
    acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)

    s0 = first_busy(s_lo)

    @pl.when(s0 < s_hi)
    def _():
        start(s0, info(safe(s0))["b_lo"], 0)

    def body(carry):  # one work item: prefetch the next, then wait for and use this one
        s, b, slot = carry
        more = b + 1 < info(s)["b_hi"]
        ns = jnp.where(more, s, first_busy(s + 1))
        nb_ = jnp.where(more, b + 1, info(safe(ns))["b_lo"])

        @pl.when(ns < s_hi)
        def _():
            start(ns, nb_, 1 - slot)

        wait(s, b, slot)
        compute(s, b, slot)
        return ns, nb_, 1 - slot

    lax.while_loop(lambda c: c[0] < s_hi, body, (s0, info(safe(s0))["b_lo"], jnp.int32(0)))

    l = l_ref[...][:, :, :1]
    o_ref[...] = jnp.where(l > 0, acc_ref[...] / l, 0.0).astype(o_ref.dtype)
    if with_lse:  # one [1, R] row per kv head: lane 0 of the lane-replicated m and l, transposed
        for h in range(Hk):
            lse = jnp.where(l_ref[h] > 0, m_ref[h] + jnp.log(l_ref[h]), -jnp.inf)  # [R, 128], lanes equal
            lse_ref[0, pl.ds(h, 1), :] = jnp.transpose(lse)[:1, :]


@functools.partial(
    jax.jit,
    static_argnames=(
        "sm_scale",
        "sliding_window",
        "soft_cap",
        "k_scale",
        "v_scale",
        "num_kv_pages_per_block",
        "num_queries_per_block",
        "vmem_limit_bytes",
        "interpret",
        "sequence_shards",
        "return_lse",
    ),
)
def ragged_paged_attention(
    queries,  # [T, Hq, D]
    kv_pages,  # [P, rows, 2*Hk, D]: rows = page_size (+ the scale trailer for int8, see `quantized`)
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
    num_kv_pages_per_block: int | None = None,
    num_queries_per_block: int | None = None,
    vmem_limit_bytes: int | None = None,
    interpret=False,
    sequence_shards: int = 1,
    sequence_index=None,
    return_lse: bool = False,
):
    """Ragged paged attention; returns [T, Hq, D] in queries.dtype (padding rows are 0).

    ``interpret``: False (compile with Mosaic), True (TPU interpret mode with default
    `pltpu.InterpretParams`) or an `InterpretParams` instance. KV dtypes: float32, bfloat16, int8
    (with its scale trailer) and float8_e4m3fn / float8_e5m2; ``k_scale`` / ``v_scale`` are per-tensor
    factors for K and V (any dtype). Static inputs are checked as JAX's `static_validate_inputs` does
    (`validate.validate_static`).

    Sequence shards (see the module docstring): with ``sequence_shards`` S > 1 the cache and page table
    hold only shard ``sequence_index`` (i32 [1], may be traced; None = shard 0) of each sequence's pages,
    column k being its page k*S + s; ``kv_lens``, ``cu_q_lens`` and the queries are the whole step's.
    ``return_lse``: returns (out float32 [T, Hq, D] normalised over the keys seen here, lse float32
    [T, Hq]: log of the sum of exp(score) over them; rows with none, padding included, give 0 and -inf),
    the parts `merge.merge_partials` / `merge.merge_over_axis` combine exactly.
    """
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
        num_kv_pages_per_block=num_kv_pages_per_block,
        num_queries_per_block=num_queries_per_block,
        vmem_limit_bytes=vmem_limit_bytes,
        sequence_shards=sequence_shards,
        sequence_index=sequence_index,
    )
    T, Hq, D = queries.shape
    P, rows, C, _ = kv_pages.shape
    S, pages_per_seq = page_indices.shape
    page_size = page_size_of(kv_pages)
    kv_bits = jnp.dtype(kv_pages.dtype).itemsize * 8
    Hk = C // 2
    G = Hq // Hk
    nb, bq = _choose_blocks(
        T,
        Hq,
        Hk,
        D,
        page_size,
        pages_per_seq,
        S,
        queries.dtype,
        kv_pages.dtype,
        num_kv_pages_per_block,
        num_queries_per_block,
        rows,
    )
    n_qb = _cdiv(T, bq)
    Tp = n_qb * bq
    R = bq * G

    # [T, Hq, D] -> [Hk, Tp*G, D], row t*G+g holds q head h*G+g of token t.
    q = jnp.pad(queries, ((0, Tp - T), (0, 0), (0, 0)))
    q = q.reshape(Tp, Hk, G, D).transpose(1, 0, 2, 3).reshape(Hk, Tp * G, D)
    # Merging (page_size, 2Hk) is a free bitcast under XLA's TPU tiling of a 16/32-bit cache (8-bit: 4-D).
    kv3 = kv_pages if kv_bits == 8 else kv_pages.reshape(P, rows * C, D)

    # Sequences overlapping q block r: [seq_lo[r], seq_hi[r]).
    live = jnp.arange(S) < num_seqs[0]
    row0 = (jnp.arange(n_qb) * bq)[:, None]
    seq_lo = jnp.sum(live & (cu_q_lens[1:] <= row0), axis=1).astype(jnp.int32)
    seq_hi = jnp.sum(live & (cu_q_lens[:-1] < row0 + bq), axis=1).astype(jnp.int32)

    kernel = functools.partial(
        _kernel,
        G=G,
        bq=bq,
        nb=nb,
        page_size=page_size,
        pages_per_seq=pages_per_seq,
        sm_scale=sm_scale,
        sliding_window=sliding_window,
        soft_cap=soft_cap,
        k_scale=k_scale,
        v_scale=v_scale,
        trailer=rows > page_size,
        shards=sequence_shards,
        with_lse=return_lse,
    )
    qspec = pl.BlockSpec((Hk, R, D), lambda r, *_: (0, r, 0))
    slot = (nb, rows, C) if kv_bits == 8 else (nb * page_size * C,)  # 8-bit: one slab per page
    scratch = [
        pltpu.VMEM((2, *slot, D), kv_pages.dtype),
        pltpu.SemaphoreType.DMA((2,)),
        pltpu.VMEM((Hk, R, _LANES), jnp.float32),
        pltpu.VMEM((Hk, R, _LANES), jnp.float32),
        pltpu.VMEM((Hk, R, D), jnp.float32),
    ]
    if kv_bits == 16:
        scratch.append(pltpu.VMEM((nb * page_size * Hk, D), jnp.uint32))
    elif kv_bits == 8:
        scratch.append(pltpu.VMEM((*slot, D), jnp.float32))
    if interpret is True:
        interpret = pltpu.InterpretParams()
    # Static cost hint for XLA (a custom call is otherwise opaque to cost analysis): an
    # upper bound assuming every sequence uses its whole page table (min(T, S) sequences).
    L = pages_per_seq * page_size if sliding_window is None else min(pages_per_seq * page_size, sliding_window + T)
    kv_bytes = min(kv_pages.size, min(T, S) * pages_per_seq * rows * C * D)
    cost = pl.CostEstimate(
        flops=4 * T * Hq * D * L,
        transcendentals=T * Hq * L,
        bytes_accessed=kv_bytes * kv_pages.dtype.itemsize + 2 * q.size * q.dtype.itemsize,
    )
    prefetch = [kv_lens, page_indices.reshape(-1), cu_q_lens, seq_lo, seq_hi]
    if sequence_shards > 1:
        prefetch.append(jnp.zeros((1,), jnp.int32) if sequence_index is None else sequence_index)
    out_shape, out_specs = jax.ShapeDtypeStruct(q.shape, queries.dtype), qspec
    if return_lse:  # float32 parts, plus the lse: a [1, R] row per q block and kv head
        out_shape = (
            jax.ShapeDtypeStruct(q.shape, jnp.float32),
            jax.ShapeDtypeStruct((n_qb, Hk, R), jnp.float32),
        )
        out_specs = (qspec, pl.BlockSpec((1, Hk, R), lambda r, *_: (r, 0, 0)))
    res = pl.pallas_call(
        kernel,
        out_shape=out_shape,
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=len(prefetch),
            grid=(n_qb,),
            in_specs=[qspec, pl.BlockSpec(memory_space=pl.ANY)],
            out_specs=out_specs,
            scratch_shapes=scratch,
        ),
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel",), vmem_limit_bytes=vmem_limit_bytes),
        interpret=interpret,
        cost_estimate=cost,
        name="ragged_paged_attention",
    )(*prefetch, q, kv3)
    out = res[0] if return_lse else res
    out = out.reshape(Hk, Tp, G, D).transpose(1, 0, 2, 3).reshape(Tp, Hq, D)[:T]
    if not return_lse:
        return out
    lse = res[1].reshape(n_qb, Hk, bq, G).transpose(0, 2, 1, 3).reshape(Tp, Hq)
    return out, lse[:T]
