"""Sequence-shard mode of ragged paged attention (issue #21): each shard holds every S-th page of each
sequence (`tests.sequence_split`, as the engine deals them) and returns its partial attention and
log-sum-exp; `merge` combines the shards exactly.

Per shard, the Pallas kernel (TPU interpret mode) and the reference are checked against a numpy float64
oracle of attention restricted to that shard's keys, computed from the unsplit cache (the keys of pages
j with j % S == s), so the kernel's local-to-absolute key mapping is checked too; rows a shard has no key
for must come out exactly 0 with lse -inf. The merged shards must equal JAX's own
`ref_ragged_paged_attention` on the unsplit cache. Shard caches are poisoned (NaN; int8: NaN scales).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax
from jax.experimental.pallas import tpu as pltpu
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from pallas_kernels.ragged_paged_attention import ragged_paged_attention, ragged_paged_attention_reference
from pallas_kernels.ragged_paged_attention.merge import merge_over_axis, merge_partials
from tests.sequence_split import split_over_sequence_shards
from tests.test_kv_quant import SM, jax_reference, quantized_case
from tests.test_ragged_paged_attention import make_case

# q_lens / kv_lens: a decode token deep in its context, a prefill chunk spanning several pages that starts
# mid-sequence, a sequence shorter than S pages (some shards hold none of it), a fresh prompt; T adds
# padding rows. Page 8 keeps the pages many and the case small.
Q_LENS, KV_LENS = [1, 21, 1, 7], [75, 40, 9, 7]
SHAPE = dict(Hq=8, Hk=2, D=64, page_size=8)

CASES = [
    # id, shards, kv dtype (float32 / bfloat16 = the queries' dtype too, or int8 under float32 queries), kwargs
    ("f32-softcap", 2, "float32", {"soft_cap": 3.0}),
    ("bf16-window", 4, "bfloat16", {"sliding_window": 19}),
    ("int8", 2, "int8", {}),
]


def shard_oracle(float_args, n, shards, shard, *, sliding_window=None, soft_cap=None):
    """numpy float64: (out [n, Hq, D], lse [n, Hq]) of each real token over the keys of its sequence's pages
    j with j % shards == shard only; rows with no such visible key give 0 and -inf."""
    q, kv, kvl, pi, cu, ns = (np.asarray(a, np.float64) if i < 2 else np.asarray(a) for i, a in enumerate(float_args))
    page, hq, hk = kv.shape[1], q.shape[1], kv.shape[2] // 2
    out, lse = np.zeros((n,) + q.shape[1:]), np.full((n, hq), -np.inf)
    for i in range(int(ns[0])):
        length = int(kvl[i])
        keys = kv[pi[i, : -(-length // page)]].reshape(-1, 2 * hk, q.shape[2])[:length]
        k = np.repeat(keys[:, 0::2], hq // hk, axis=1)
        v = np.repeat(keys[:, 1::2], hq // hk, axis=1)
        at = np.arange(length)
        for t in range(int(cu[i]), int(cu[i + 1])):
            pos = length - (int(cu[i + 1]) - int(cu[i])) + (t - int(cu[i]))
            vis = (at <= pos) & (at // page % shards == shard)
            if sliding_window is not None:
                vis &= at > pos - sliding_window
            if not vis.any():
                continue
            s = np.einsum("hd,lhd->hl", q[t], k[vis]) * SM
            if soft_cap is not None:
                s = soft_cap * np.tanh(s / soft_cap)
            top = s.max(-1, keepdims=True)
            p = np.exp(s - top)
            lse[t] = np.log(p.sum(-1)) + top[:, 0]
            out[t] = np.einsum("hl,lhd->hd", p / p.sum(-1, keepdims=True), v[vis])
    return out, lse


def build(kv_dtype):
    """(args, float32 args of the same values, real rows): int8 through test_kv_quant's packer."""
    if kv_dtype == "int8":
        return quantized_case(5, Q_LENS, KV_LENS, kv_dtype="int8", T=sum(Q_LENS) + 5, **SHAPE)
    args, n = make_case(5, Q_LENS, KV_LENS, dtype=jnp.dtype(kv_dtype), T=sum(Q_LENS) + 5, **SHAPE)
    return args, tuple(a.astype(jnp.float32) if i < 2 else a for i, a in enumerate(args)), n


def check_parts(parts, float_args, n, shards, kw, atol, some_shard_empty=True):
    """Each shard's (out, lse) vs the float64 oracle; padding rows 0 / -inf; returns the merge."""
    outs, lses, some_empty = [], [], False
    for s, (out, lse) in enumerate(parts):
        assert out.dtype == jnp.float32 and lse.dtype == jnp.float32 and lse.shape == out.shape[:2]
        out, lse = np.asarray(out), np.asarray(lse)
        want_out, want_lse = shard_oracle(float_args, n, shards, s, **kw)
        empty = np.isneginf(want_lse)
        assert not empty.all()
        some_empty = some_empty or empty.any()
        np.testing.assert_array_equal(lse[:n][empty], -np.inf)
        np.testing.assert_array_equal(out[:n][empty], 0.0)  # exactly 0, not NaN
        np.testing.assert_allclose(lse[:n][~empty], want_lse[~empty], atol=atol, rtol=0)
        np.testing.assert_allclose(out[:n], want_out, atol=atol, rtol=0)
        np.testing.assert_array_equal(out[n:], 0.0)  # padding rows
        np.testing.assert_array_equal(lse[n:], -np.inf)
        outs.append(out)
        lses.append(lse)
    assert some_empty == some_shard_empty  # the case has rows some shard sees nothing for
    return np.asarray(merge_partials(jnp.asarray(np.stack(outs)), jnp.asarray(np.stack(lses))))


@pytest.mark.parametrize("shards,kv_dtype,kw", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_kernel_and_reference_per_shard_and_merged(shards, kv_dtype, kw):
    args, float_args, n = build(kv_dtype)
    assert n < args[0].shape[0]  # padding rows present
    want = jax_reference(float_args, n, **kw)  # JAX's own reference on the unsplit (dequantized) cache
    # bf16 parts: P@V runs in bfloat16 in the kernel; scores are exact products of bf16 values in both
    atol = {"float32": 2e-5, "bfloat16": 2e-2, "int8": 2e-5}[kv_dtype]
    split = split_over_sequence_shards(args, shards)
    common = dict(sm_scale=SM, sequence_shards=shards, return_lse=True, **kw)

    def per_shard(fn, **extra):
        return [fn(*a, sequence_index=jnp.array([s], jnp.int32), **common, **extra) for s, a in enumerate(split)]

    kernel_parts = per_shard(
        ragged_paged_attention, num_queries_per_block=8, num_kv_pages_per_block=2, interpret=pltpu.InterpretParams()
    )
    merged = check_parts(kernel_parts, float_args, n, shards, kw, atol)
    np.testing.assert_allclose(merged[:n], want, atol=atol, rtol=0)
    merged = check_parts(per_shard(ragged_paged_attention_reference), float_args, n, shards, kw, 2e-5)
    np.testing.assert_allclose(merged[:n], want, atol=2e-5 if kv_dtype != "bfloat16" else 1e-4, rtol=0)


def test_return_lse_without_sequence_shards():
    """return_lse alone (one shard, the whole cache): the full attention in float32 and its log-sum-exp."""
    args, float_args, n = build("bfloat16")
    out, lse = ragged_paged_attention(*args, sm_scale=SM, return_lse=True, num_queries_per_block=8, interpret=True)
    merged = check_parts([(out, lse)], float_args, n, 1, {}, 2e-2, some_shard_empty=False)
    np.testing.assert_allclose(merged[:n], jax_reference(float_args, n), atol=2e-2, rtol=0)


def numpy_merge(outs, lses):
    """float64 log-sum-exp merge of stacked parts, written out: sum_s exp(lse_s) out_s / sum_s exp(lse_s)."""
    outs, lses = np.asarray(outs, np.float64), np.asarray(lses, np.float64)
    top = np.max(lses, axis=0)
    w = np.exp(lses - np.where(np.isfinite(top), top, 0.0))  # exp(-inf) = 0
    den = w.sum(0)
    return (w[..., None] * outs).sum(0) / np.where(den > 0, den, 1.0)[..., None]


def random_parts(shards, t=6, hq=4, d=8):
    rng = np.random.default_rng(3)
    outs = rng.standard_normal((shards, t, hq, d)).astype(np.float32)
    lses = (rng.standard_normal((shards, t, hq)) * 3 + 700).astype(np.float32)  # exp(700) overflows float32
    lses[0, 0] = -np.inf  # one shard has no key for a row
    lses[1:, 1] = -np.inf  # only shard 0 has keys: the merge is its part
    lses[:, 2, 0] = -np.inf  # no shard has a key (padding): 0, not NaN
    outs[lses == -np.inf] = 0.0
    return outs, lses


def test_merge_partials_against_numpy():
    outs, lses = random_parts(4)
    got = np.asarray(merge_partials(jnp.asarray(outs), jnp.asarray(lses)))
    assert np.isfinite(got).all()
    np.testing.assert_allclose(got, numpy_merge(outs, lses), rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(got[1], outs[0, 1])
    np.testing.assert_array_equal(got[2, 0], 0.0)


def test_merge_over_axis_in_shard_map_equals_merge_partials():
    assert jax.device_count() >= 8
    mesh = Mesh(np.array(jax.devices()[:8]).reshape(2, 4), ("data", "sequence"))
    outs, lses = random_parts(4)
    stacked = np.stack([outs, outs[::-1]])  # [data, sequence, ...]: each data row its own parts
    stacked_lse = np.stack([lses, lses[::-1]])

    def local(out, lse):
        return merge_over_axis(out[0, 0], lse[0, 0], "sequence")[None, None]

    fn = jax.shard_map(
        local, mesh=mesh, in_specs=(P("data", "sequence"), P("data", "sequence")), out_specs=P("data", "sequence")
    )
    args = [jax.device_put(a, NamedSharding(mesh, P("data", "sequence"))) for a in (stacked, stacked_lse)]
    got = np.asarray(jax.jit(fn)(*args))  # [data, sequence, T, Hq, D]: every sequence shard's copy
    for row in range(2):
        want = np.asarray(merge_partials(jnp.asarray(stacked[row]), jnp.asarray(stacked_lse[row])))
        for s in range(4):
            np.testing.assert_allclose(got[row, s], want, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(got[0, 0], numpy_merge(outs, lses), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("fn", [ragged_paged_attention, ragged_paged_attention_reference], ids=["kernel", "reference"])
@pytest.mark.parametrize(
    "kw,match",
    [
        ({"sequence_shards": 0}, "sequence_shards=0 must be an int >= 1"),
        ({"sequence_shards": 2, "sequence_index": jnp.array([0, 1], jnp.int32)}, r"sequence_index \(shape \(2,\)"),
        ({"sequence_shards": 2, "sequence_index": jnp.array([1.0], jnp.float32)}, "dtype float32"),
    ],
)
def test_bad_sequence_arguments_refused(fn, kw, match):
    args, _ = make_case(0, [1], [5], Hq=2, Hk=1, D=8, page_size=4)
    with pytest.raises(ValueError, match=match):
        fn(*args, **kw)


def test_sequence_shard_kernel_compiles_for_tpu_v5e():
    """The engine's call (paged_attention.py): the kernel in sequence-shard mode inside shard_map over a
    ('sequence', 'tensor') v5e:2x4 mesh, the shard index from axis_index, then the merge over 'sequence'."""
    from jax.experimental import topologies

    try:
        topo = topologies.get_topology_desc(platform="tpu", topology_name="v5e:2x4")
    except Exception as e:  # libtpu missing or unusable
        pytest.skip(f"no TPU topology: {e}")
    mesh = Mesh(np.array(topo.devices).reshape(2, 4), ("sequence", "tensor"))
    T, S, pps, Hq, Hk, D, page = 32, 8, 8, 8, 4, 128, 16
    qs, kvs, rep = P(None, "tensor", None), P("sequence", None, "tensor", None), P()

    def local(q, kv, kv_lens, table, cu, ns):
        index = lax.axis_index("sequence")[None].astype(jnp.int32)
        out, lse = ragged_paged_attention(
            q, kv, kv_lens, table, cu, ns, sm_scale=0.1, sequence_shards=2, sequence_index=index, return_lse=True
        )
        return merge_over_axis(out, lse, "sequence").astype(q.dtype)

    specs = (qs, kvs, rep, rep, rep, rep)
    fn = jax.shard_map(local, mesh=mesh, in_specs=specs, out_specs=qs, check_vma=False)
    shapes = [
        ((T, Hq, D), jnp.bfloat16),
        ((2 * S * pps, page, 2 * Hk, D), jnp.bfloat16),
        ((S,), jnp.int32),
        ((S, pps), jnp.int32),
        ((S + 1,), jnp.int32),
        ((1,), jnp.int32),
    ]
    args = [jax.ShapeDtypeStruct(s, d, sharding=NamedSharding(mesh, sp)) for (s, d), sp in zip(shapes, specs)]
    compiled = jax.jit(fn).lower(*args).compile()
    assert "tpu_custom_call" in compiled.as_text()
