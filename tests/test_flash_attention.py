"""Flash attention: reference vs hand-computed cases and an independent numpy oracle; the
Pallas kernel vs the reference in TPU interpret mode (on CPU); AOT TPU compile.

K/V past the last position any query may see are NaN, so a kernel that reads and uses a
fully masked block (or a masked tail of a visible one) produces NaN and fails.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.flash_attention import flash_attention, flash_attention_reference

TOL = {jnp.float32: 2e-5, jnp.bfloat16: 3e-2}


def oracle(q, k, v, sm_scale, causal, q_offset):
    """Independent numpy loop: per batch, query and head, softmax over visible keys."""
    q, k, v = (np.asarray(x, np.float32) for x in (q, k, v))
    B, T, Hq, D = q.shape
    G = Hq // k.shape[2]
    out = np.zeros_like(q)
    for b in range(B):
        for t in range(T):
            n_vis = k.shape[1] if not causal else (0 if q_offset is None else q_offset[b]) + t + 1
            for h in range(Hq):
                s = k[b, :n_vis, h // G] @ q[b, t, h] * sm_scale
                p = np.exp(s - s.max())
                out[b, t, h] = (p / p.sum()) @ v[b, :n_vis, h // G]
    return out


def test_reference_single_key_returns_its_value():
    v = np.array([[[[1.5, -2.0, 0.25]]]], np.float32)  # [1, 1, 1, 3]
    out = flash_attention_reference(jnp.ones((1, 1, 2, 3)), jnp.ones((1, 1, 1, 3)), v, sm_scale=0.3)
    np.testing.assert_array_equal(np.asarray(out)[0, 0], np.repeat(v[0, 0], 2, 0))


def test_reference_equal_keys_give_running_mean():
    rng = np.random.default_rng(0)
    v = rng.standard_normal((1, 6, 1, 4)).astype(np.float32)
    k = np.ones((1, 6, 1, 4), np.float32)
    q = rng.standard_normal((1, 6, 1, 4)).astype(np.float32)
    out = np.asarray(flash_attention_reference(q, k, v, sm_scale=1.0))
    expect = np.cumsum(v[0, :, 0], 0) / np.arange(1, 7)[:, None]  # causal prefix mean
    np.testing.assert_allclose(out[0, :, 0], expect, rtol=1e-6, atol=1e-6)


def test_reference_two_tokens_by_hand():
    q = np.array([[[[1.0, 0.0]], [[1.0, 0.0]]]], np.float32)  # [1, 2, 1, 2]
    k = np.array([[[[0.0, 0.0]], [[np.log(3.0), 0.0]]]], np.float32)
    v = np.array([[[[1.0, 0.0]], [[0.0, 1.0]]]], np.float32)
    out = np.asarray(flash_attention_reference(q, k, v, sm_scale=1.0))[0, :, 0]
    np.testing.assert_allclose(out, [[1.0, 0.0], [0.25, 0.75]], atol=1e-6)
    # offset 1: the first query is already at position 1 and sees both keys.
    off = np.asarray(flash_attention_reference(q[:, :1], k, v, sm_scale=1.0, q_offset=jnp.array([1])))[0, 0, 0]
    np.testing.assert_allclose(off, [0.25, 0.75], atol=1e-6)


@pytest.mark.parametrize("causal,offset", [(True, None), (True, [3, 9]), (False, None)])
def test_reference_vs_oracle(causal, offset):
    rng = np.random.default_rng(1)
    q = rng.standard_normal((2, 5, 4, 8)).astype(np.float32)
    k, v = (rng.standard_normal((2, 14, 2, 8)).astype(np.float32) for _ in range(2))
    off = None if offset is None else jnp.array(offset, jnp.int32)
    ref = flash_attention_reference(q, k, v, sm_scale=0.4, causal=causal, q_offset=off)
    np.testing.assert_allclose(np.asarray(ref), oracle(q, k, v, 0.4, causal, offset), rtol=1e-5, atol=1e-5)


# id, B, T, S, Hq, Hk, D, dtype, causal, offsets, block_q, block_kv
CASES = [
    ("g1-d128-f32-offsets", 2, 24, 80, 2, 2, 128, jnp.float32, True, [56, 9], 8, 32),
    ("g4-d64-bf16-square", 1, 40, 40, 8, 2, 64, jnp.bfloat16, True, None, 8, 16),
    ("g8-d128-bf16-noncausal", 1, 20, 36, 8, 1, 128, jnp.bfloat16, False, None, 8, 32),
    ("g4-d64-f32-offsets", 2, 17, 50, 4, 1, 64, jnp.float32, True, [30, 0], 8, 16),
]


@pytest.mark.parametrize("B,T,S,Hq,Hk,D,dtype,causal,offsets,bq,bk", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_kernel_matches_reference(B, T, S, Hq, Hk, D, dtype, causal, offsets, bq, bk):
    rng = np.random.default_rng(2)
    q = rng.standard_normal((B, T, Hq, D)).astype(np.float32)
    k, v = (rng.standard_normal((B, S, Hk, D)).astype(np.float32) for _ in range(2))
    off = None if offsets is None else jnp.array(offsets, jnp.int32)
    if causal:  # positions nobody can see are NaN: reading them must not matter
        for b in range(B):
            last = (0 if offsets is None else offsets[b]) + T - 1
            k[b, last + 1 :] = np.nan
            v[b, last + 1 :] = np.nan
    q, k, v = (jnp.asarray(x, dtype) for x in (q, k, v))
    sm = D**-0.5
    out = flash_attention(
        q, k, v, sm_scale=sm, causal=causal, q_offset=off, block_q=bq, block_kv=bk, interpret=pltpu.InterpretParams()
    )
    assert out.shape == q.shape and out.dtype == q.dtype
    ref = flash_attention_reference(q, k, v, sm_scale=sm, causal=causal, q_offset=off)
    out, ref = np.asarray(out, np.float32), np.asarray(ref, np.float32)
    assert np.isfinite(out).all()
    np.testing.assert_allclose(out, ref, atol=TOL[dtype], rtol=0)


def test_aot_compile_tpu_v5e_sharded():
    from jax.experimental import topologies
    from jax.sharding import Mesh, NamedSharding
    from jax.sharding import PartitionSpec as P

    try:
        topo = topologies.get_topology_desc(platform="tpu", topology_name="v5e:2x2")
    except Exception as e:  # libtpu missing or unusable
        pytest.skip(f"no TPU topology: {e}")
    mesh = Mesh(np.array(topo.devices).reshape(2, 2), ("data", "tensor"))
    sp = P("data", None, "tensor", None)
    f = jax.shard_map(
        lambda q, k, v, o: flash_attention(q, k, v, sm_scale=0.1, q_offset=o),
        mesh=mesh,
        in_specs=(sp, sp, sp, P("data")),
        out_specs=sp,
        check_vma=False,
    )
    shapes = [
        ((2, 256, 8, 128), jnp.bfloat16, sp),
        ((2, 512, 4, 128), jnp.bfloat16, sp),
        ((2, 512, 4, 128), jnp.bfloat16, sp),
        ((2,), jnp.int32, P("data")),
    ]
    args = [jax.ShapeDtypeStruct(s, d, sharding=NamedSharding(mesh, p)) for s, d, p in shapes]
    compiled = jax.jit(f).lower(*args).compile()
    assert "tpu_custom_call" in compiled.as_text()
