"""Ragged paged attention: reference vs hand-computed cases and independent oracles; the
Pallas kernel vs the reference in TPU interpret mode (on CPU); AOT TPU compile.

Every test cache is hostile: pages no sequence owns, the slots past kv_len in a
sequence's last page, the page-table entries past a sequence's pages (pointing at a NaN
page) and the padding query rows are all NaN, so any stray read that reaches an output
shows up as NaN. Padding query rows are excluded from comparisons.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.ragged_paged_attention import ragged_paged_attention, ragged_paged_attention_reference

TOL = {jnp.float32: 2e-5, jnp.bfloat16: 3e-2}  # max abs error, outputs are O(1)


def make_case(
    seed, q_lens, kv_lens, *, Hq, Hk, D, page_size, dtype=jnp.float32, max_num_seqs=None, pages_per_seq=None, T=None
):
    """Random ragged batch; returns (args tuple, number of real query rows)."""
    rng = np.random.default_rng(seed)
    n = len(q_lens)
    S = max_num_seqs or n + 2
    pps = pages_per_seq or max(-(-L // page_size) for L in kv_lens) + 1
    used = sum(-(-L // page_size) for L in kv_lens)
    P = used + 5  # spare pages stay NaN
    kv = np.full((P, page_size, 2 * Hk, D), np.nan, np.float32)
    perm = rng.permutation(P)
    nan_page = perm[-1]
    page_indices = np.full((S, pps), nan_page, np.int32)  # unused entries -> a NaN page
    nxt = 0
    for i, L in enumerate(kv_lens):
        for p in range(-(-L // page_size)):
            page = perm[nxt]
            nxt += 1
            page_indices[i, p] = page
            fill = min(page_size, L - p * page_size)
            kv[page, :fill] = rng.standard_normal((fill, 2 * Hk, D))
    cu = np.zeros(S + 1, np.int32)
    cu[1 : n + 1] = np.cumsum(q_lens)
    cu[n + 1 :] = cu[n]
    kvl = np.full(S, 10**6, np.int32)  # dead slots hold garbage
    kvl[:n] = kv_lens
    total = int(cu[n])
    T = T or total + 3
    q = np.full((T, Hq, D), np.nan, np.float32)  # padding rows are NaN
    q[:total] = rng.standard_normal((total, Hq, D))
    args = (
        jnp.asarray(q, dtype),
        jnp.asarray(kv, dtype),
        jnp.asarray(kvl),
        jnp.asarray(page_indices),
        jnp.asarray(cu),
        jnp.array([n], jnp.int32),
    )
    return args, total


def dense_oracle(args, n_tokens, *, sm_scale, sliding_window=None, soft_cap=None):
    """Independent numpy oracle: per sequence, gather pages, dense masked softmax."""
    q, kv, kvl, pi, cu, ns = (np.asarray(a, np.float32) if i < 2 else np.asarray(a) for i, a in enumerate(args))
    Hq, Hk = q.shape[1], kv.shape[2] // 2
    out = np.zeros((n_tokens,) + q.shape[1:], np.float32)
    for i in range(int(ns[0])):
        L = int(kvl[i])
        pages = kv[pi[i, : -(-L // kv.shape[1])]].reshape(-1, 2 * Hk, q.shape[2])[:L]
        k = np.repeat(pages[:, 0::2], Hq // Hk, axis=1)  # [L, Hq, D]
        v = np.repeat(pages[:, 1::2], Hq // Hk, axis=1)
        for t in range(int(cu[i]), int(cu[i + 1])):
            pos = L - (int(cu[i + 1]) - int(cu[i])) + (t - int(cu[i]))
            s = np.einsum("hd,lhd->hl", q[t], k) * sm_scale
            if soft_cap is not None:
                s = soft_cap * np.tanh(s / soft_cap)
            vis = np.arange(L) <= pos
            if sliding_window is not None:
                vis &= np.arange(L) > pos - sliding_window
            s = np.where(vis, s, -np.inf)
            p = np.exp(s - s.max(-1, keepdims=True))
            p /= p.sum(-1, keepdims=True)
            out[t] = np.einsum("hl,lhd->hd", p, np.where(vis[:, None, None], v, 0))
    return out


def _single(q, k, v, kv_len_extra_pages=0):
    """One sequence, Hq = Hk = 1, page_size 8: q [Tq, D], k/v [L, D] (f32)."""
    L, D = k.shape
    Tq = q.shape[0]
    kv = np.full((2 + kv_len_extra_pages, 8, 2, D), np.nan, np.float32)
    kv[1, :L, 0], kv[1, :L, 1] = k, v
    args = (
        jnp.asarray(q[:, None]),
        jnp.asarray(kv),
        jnp.array([L, 0], jnp.int32),
        jnp.array([[1, 0], [0, 0]], jnp.int32),
        jnp.array([0, Tq, Tq], jnp.int32),
        jnp.array([1], jnp.int32),
    )
    return args


# ----------------------------------------------------------------- reference, by hand
def test_reference_single_kv_token_returns_its_value():
    v = np.array([[0.3, -1.5, 2.0, 7.0]], np.float32)
    args = _single(np.array([[1.0, 2.0, 3.0, 4.0]], np.float32), np.ones((1, 4), np.float32), v)
    out = ragged_paged_attention_reference(*args, sm_scale=0.7)
    np.testing.assert_array_equal(np.asarray(out)[0, 0], v[0])


def test_reference_equal_keys_average_values():
    rng = np.random.default_rng(1)
    v = rng.standard_normal((5, 4)).astype(np.float32)
    k = np.tile(rng.standard_normal((1, 4)).astype(np.float32), (5, 1))
    args = _single(rng.standard_normal((1, 4)).astype(np.float32), k, v)
    out = ragged_paged_attention_reference(*args)
    np.testing.assert_allclose(np.asarray(out)[0, 0], v.mean(0), rtol=1e-6, atol=1e-6)


def test_reference_two_tokens_by_hand():
    # scores: q.k0 = 0, q.k1 = ln 3  ->  p = [1/4, 3/4];  v0 = e0, v1 = e1.
    q = np.array([[1.0, 0.0], [1.0, 0.0]], np.float32)  # a 2-token prefill chunk
    k = np.array([[0.0, 0.0], [np.log(3.0), 0.0]], np.float32)
    v = np.eye(2, dtype=np.float32)
    out = np.asarray(ragged_paged_attention_reference(*_single(q, k, v)))[:, 0]
    np.testing.assert_allclose(out[0], [1.0, 0.0], atol=1e-7)  # causal: sees only k0
    np.testing.assert_allclose(out[1], [0.25, 0.75], atol=1e-6)
    sw = np.asarray(ragged_paged_attention_reference(*_single(q, k, v), sliding_window=1))
    np.testing.assert_allclose(sw[1, 0], [0.0, 1.0], atol=1e-7)  # window 1: only itself
    # soft cap ln 3 turns a huge score into ~ln 3: back to [1/4, 3/4].
    k_big = np.array([[0.0, 0.0], [100.0, 0.0]], np.float32)
    cap = np.asarray(ragged_paged_attention_reference(*_single(q, k_big, v), soft_cap=float(np.log(3.0))))
    np.testing.assert_allclose(cap[1, 0], [0.25, 0.75], atol=1e-6)


# ------------------------------------------------------ reference, independent oracles
@pytest.mark.parametrize("kw", [{}, {"sliding_window": 5}, {"soft_cap": 3.0}])
def test_reference_vs_oracles(kw):
    args, n = make_case(0, [1, 6, 1, 9], [9, 21, 1, 12], Hq=8, Hk=2, D=16, page_size=4)
    ref = np.asarray(ragged_paged_attention_reference(*args, sm_scale=0.3, **kw))[:n]
    assert np.isfinite(ref).all()
    np.testing.assert_allclose(ref, dense_oracle(args, n, sm_scale=0.3, **kw), rtol=1e-5, atol=1e-5)
    from jax.experimental.pallas.ops.tpu.ragged_paged_attention import ref_ragged_paged_attention

    jax_ref = np.asarray(ref_ragged_paged_attention(*args, sm_scale=0.3, **kw))
    np.testing.assert_allclose(ref, jax_ref[:n], rtol=1e-5, atol=1e-5)


# ------------------------------------------------------ kernel vs reference (interpret)
# Each row covers a different corner of {decode, prefill, mixed} x page {16, 32} x
# q/kv ratio {1, 4, 8} x head_dim {64, 128} x {f32, bf16}, plus window / soft cap.
KERNEL_CASES = [
    # id, q_lens, kv_lens, Hq, Hk, D, page, dtype, extra kwargs
    ("decode", [1] * 6, [17, 1, 40, 33, 16, 64], 4, 4, 128, 16, jnp.float32, {}),
    ("decode", [1] * 5, [70, 3, 32, 31, 45], 8, 2, 64, 32, jnp.bfloat16, {}),
    ("prefill", [24, 13], [40, 13], 8, 1, 64, 16, jnp.float32, {}),
    ("prefill", [20], [52], 4, 4, 128, 32, jnp.bfloat16, {}),
    ("mixed", [1, 11, 1, 6, 1], [30, 11, 65, 20, 2], 8, 2, 128, 16, jnp.bfloat16, {}),
    ("mixed", [5, 1, 12, 1], [37, 9, 12, 50], 16, 2, 64, 32, jnp.float32, {}),
    ("mixed-window", [1, 14, 1], [45, 30, 8], 8, 2, 64, 16, jnp.bfloat16, {"sliding_window": 12}),
    ("mixed-softcap", [3, 1, 9], [35, 64, 9], 4, 4, 128, 32, jnp.float32, {"soft_cap": 4.0}),
]


@pytest.mark.parametrize(
    "q_lens,kv_lens,Hq,Hk,D,page,dtype,kw",
    [c[1:] for c in KERNEL_CASES],
    ids=[f"{c[0]}-p{c[6]}-g{c[3] // c[4]}-d{c[5]}-{jnp.dtype(c[7]).name}" for c in KERNEL_CASES],
)
def test_kernel_matches_reference(q_lens, kv_lens, Hq, Hk, D, page, dtype, kw):
    args, n = make_case(7, q_lens, kv_lens, Hq=Hq, Hk=Hk, D=D, page_size=page, dtype=dtype)
    sm = D**-0.5
    G = Hq // Hk
    bq = max(8, 16 // G) if dtype == jnp.bfloat16 else 8  # small blocks: sequences span
    out = ragged_paged_attention(
        *args, sm_scale=sm, num_queries_per_block=bq, num_kv_pages_per_block=2, interpret=pltpu.InterpretParams(), **kw
    )
    assert out.shape == args[0].shape and out.dtype == args[0].dtype
    out = np.asarray(out, np.float32)[:n]
    ref = np.asarray(ragged_paged_attention_reference(*args, sm_scale=sm, **kw), np.float32)
    assert np.isfinite(out).all()
    np.testing.assert_allclose(out, ref[:n], atol=TOL[dtype], rtol=0)


def test_kernel_default_block_sizes():
    args, n = make_case(3, [1, 7, 1], [33, 7, 90], Hq=8, Hk=2, D=128, page_size=16, dtype=jnp.bfloat16)
    out = ragged_paged_attention(*args, sm_scale=0.1, interpret=True)
    ref = ragged_paged_attention_reference(*args, sm_scale=0.1)
    np.testing.assert_allclose(np.asarray(out, np.float32)[:n], np.asarray(ref, np.float32)[:n], atol=TOL[jnp.bfloat16])


# --------------------------------------------------------------------- AOT TPU compile
def _tpu_mesh():
    from jax.experimental import topologies

    try:
        topo = topologies.get_topology_desc(platform="tpu", topology_name="v5e:2x2")
    except Exception as e:  # libtpu missing or unusable
        pytest.skip(f"no TPU topology: {e}")
    from jax.sharding import Mesh

    return Mesh(np.array(topo.devices).reshape(2, 2), ("data", "tensor"))


def test_aot_compile_tpu_v5e_sharded():
    import functools

    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    mesh = _tpu_mesh()
    T, S, pps, Hq, Hk, D, page = 32, 8, 16, 8, 4, 128, 16
    specs = (P(None, "tensor", None), P(None, None, "tensor", None), P(), P(), P(), P())
    f = jax.shard_map(
        functools.partial(ragged_paged_attention, sm_scale=0.1),
        mesh=mesh,
        in_specs=specs,
        out_specs=P(None, "tensor", None),
        check_vma=False,
    )
    shapes = [
        ((T, Hq, D), jnp.bfloat16),
        ((S * pps + 1, page, 2 * Hk, D), jnp.bfloat16),
        ((S,), jnp.int32),
        ((S, pps), jnp.int32),
        ((S + 1,), jnp.int32),
        ((1,), jnp.int32),
    ]
    args = [jax.ShapeDtypeStruct(s, d, sharding=NamedSharding(mesh, sp)) for (s, d), sp in zip(shapes, specs)]
    compiled = jax.jit(f).lower(*args).compile()
    assert "tpu_custom_call" in compiled.as_text()
    assert compiled.memory_analysis().temp_size_in_bytes < 2**20  # no cache relayout copy


def test_compile_script_small(tmp_path):
    """scripts/kernels_tpu_compile.py --small: every config compiles and reports costs."""
    import importlib.util
    import json
    import pathlib

    _tpu_mesh()  # skips without libtpu
    path = pathlib.Path(__file__).parents[1] / "scripts" / "kernels_tpu_compile.py"
    spec = importlib.util.spec_from_file_location("kernels_tpu_compile", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    out = tmp_path / "r.json"
    res = mod.main(["--small", "--json", str(out)])
    assert json.loads(out.read_text()) == res
    step = res["v5e:2x2"].pop("decode_step")
    for name, r in res["v5e:2x2"].items():
        assert r["ok"], (name, r)
        assert r["cost"]["flops"] > 0 and r["cost"]["bytes accessed"] > 0
    for kind in ("pallas", "pallas_int8_kv", "xla"):  # the engine's whole decode step, with the kernel and without
        assert step[kind]["ok"], step[kind]
        assert step[kind]["memory"]["argument"] > 0
    assert step["pallas"]["mosaic_kernel_in_step"] and not step["xla"]["mosaic_kernel_in_step"]
    assert step["pallas_int8_kv"]["mosaic_kernel_in_step"]
    # an int8 cache is smaller than the bfloat16 one (its values at 1 byte, plus one scale row per page), and costs
    # no cache-sized temporary (a relayout copy of it would)
    int8, bf16 = step["pallas_int8_kv"]["memory"], step["pallas"]["memory"]
    assert int8["argument"] < bf16["argument"] and int8["temp"] <= bf16["temp"] * 1.1
