"""The native CPU paged-attention kernel (jaxinfer.native) against JAX's own ragged paged attention
reference, on hostile caches (NaN wherever a stray read could land), and its edge cases. How the
platform policy picks it, and what happens when it cannot be built, is tests/test_platform.py."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas.ops.tpu.ragged_paged_attention import ref_ragged_paged_attention

from jaxinfer import native
from jaxinfer.engine import xla_attention
from jaxinfer.engine.xla_attention import xla_ragged_paged_attention
from tests.test_ragged_paged_attention import TOL, make_case

pytestmark = pytest.mark.skipif(not native.available(), reason=f"native kernels: {native.unavailable_reason()}")

CASES = [
    # id, q_lens, kv_lens, Hq, Hk, D, page, dtype
    ("decode", [1] * 6, [17, 1, 40, 33, 16, 64], 4, 4, 128, 16, jnp.float32),
    ("decode-gqa3", [1] * 5, [70, 3, 32, 31, 45], 9, 3, 64, 16, jnp.float32),
    ("decode-bf16", [1] * 5, [70, 3, 32, 31, 45], 8, 2, 64, 32, jnp.bfloat16),
    ("prefill-cached-prefix", [24, 13], [40, 13], 8, 1, 64, 16, jnp.float32),
    ("prefill-bf16", [20, 70], [52, 90], 4, 4, 128, 32, jnp.bfloat16),
    ("mixed", [1, 11, 1, 6, 1, 0], [30, 11, 65, 20, 2, 0], 8, 2, 128, 16, jnp.float32),
    ("long-context", [1, 1, 30], [300, 129, 330], 8, 2, 64, 16, jnp.float32),
]


@pytest.mark.parametrize(
    "use_native,single_pass_tokens",
    [(True, 0), (False, 0), (False, 1024)],
    ids=["native", "xla-two-part", "xla-single-pass"],
)
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_paged_paths_match_jax_reference(case, single_pass_tokens, use_native, monkeypatch):
    """The native kernel reads every step in one pass, whatever SINGLE_PASS_TOKENS says. The XLA path,
    both ways, on the same hostile caches: padding rows must not leak NaN."""
    monkeypatch.setattr(xla_attention, "SINGLE_PASS_TOKENS", single_pass_tokens)
    _, q_lens, kv_lens, hq, hk, d, page, dtype = case
    args, n = make_case(len(q_lens), q_lens, kv_lens, Hq=hq, Hk=hk, D=d, page_size=page, dtype=dtype)
    fn = jax.jit(xla_ragged_paged_attention, static_argnames=("sm_scale", "native"))
    ours = np.asarray(fn(*args, sm_scale=0.125, native=use_native), np.float32)
    ref = np.asarray(ref_ragged_paged_attention(*args, sm_scale=0.125), np.float32)
    assert np.isfinite(ours[:n]).all()
    np.testing.assert_allclose(ours[:n], ref[:n], atol=TOL[dtype], rtol=0)
    assert (ours[n:] == 0).all()  # padding rows


def test_kernel_state_rows_and_clamping():
    """The raw kernel: (m, l, acc) per row; no visible key gives (-inf, 0, 0); page ids, sequence ids
    and limits out of range are clamped instead of reading outside the cache."""
    rng = np.random.default_rng(0)
    pages, page, hk, g, d = 4, 8, 2, 3, 16
    kv = jnp.asarray(rng.standard_normal((pages, page, 2 * hk, d)), jnp.float32)
    q = jnp.asarray(rng.standard_normal((3, hk, g, d)), jnp.float32)
    table = jnp.array([[2, 0], [10**6, -5]], jnp.int32)
    seq = jnp.array([0, 0, 7], jnp.int32)
    limit = jnp.array([0, 11, 10**6], jnp.int32)
    m, l, acc = jax.jit(native.paged_context)(q, kv, table, seq, limit)
    assert np.isneginf(np.asarray(m[0])).all() and (np.asarray(l[0]) == 0).all() and (np.asarray(acc[0]) == 0).all()
    # row 1: positions 0..10 of sequence 0 = page 2 (8 keys) then page 0 (3 keys), against numpy
    keys = np.concatenate([np.asarray(kv[2]), np.asarray(kv[0, :3])])  # [11, 2Hk, D]
    for h in range(hk):
        s = np.einsum("gd,kd->gk", np.asarray(q[1, h]), keys[:, 2 * h])
        mx = s.max(-1)
        p = np.exp(s - mx[:, None])
        np.testing.assert_allclose(np.asarray(m[1, h]), mx, rtol=1e-6)
        np.testing.assert_allclose(np.asarray(l[1, h]), p.sum(-1), rtol=1e-5)
        np.testing.assert_allclose(np.asarray(acc[1, h]), p @ keys[:, 2 * h + 1], rtol=1e-5, atol=1e-5)
    assert np.isfinite(np.asarray(acc[2])).all()  # seq 7 -> 1, limit -> 16, page ids -> 3 and 0
