"""The engine's CPU/GPU attention path equals the plain reference on ragged batches."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxinfer.engine import xla_attention
from jaxinfer.engine.xla_attention import xla_ragged_paged_attention
from pallas_kernels.ragged_paged_attention import ragged_paged_attention_reference


def ragged_batch(rng, q_lens, kv_lens, hq=8, hk=2, d=32, page=16, pages=40, width=8):
    """Random batch; unused pages and table entries hold NaN pages so stray reads show."""
    kv = rng.standard_normal((pages, page, 2 * hk, d)).astype(np.float32)
    table = np.full((len(q_lens), width), pages - 1, np.int32)  # last page: NaN, never legitimately used
    kv[pages - 1] = np.nan
    free = list(rng.permutation(pages - 1))
    for i, n in enumerate(kv_lens):
        need = -(-n // page)
        table[i, :need] = [free.pop() for _ in range(need)]
    t = sum(q_lens) + 3  # 3 padding rows
    q = rng.standard_normal((t, hq, d)).astype(np.float32)
    cu = np.concatenate([[0], np.cumsum(q_lens)]).astype(np.int32)
    return (
        jnp.asarray(q),
        jnp.asarray(kv),
        jnp.asarray(np.array(kv_lens, np.int32)),
        jnp.asarray(table),
        jnp.asarray(cu),
        jnp.asarray(np.array([len(q_lens)], np.int32)),
    )


@pytest.mark.parametrize(
    "q_lens,kv_lens,pages,width",
    [
        ([1, 1, 1, 1], [1, 17, 40, 100], 40, 8),  # decode
        ([20, 33], [20, 60], 40, 8),  # prefill chunks (second one continues a cached prefix)
        ([1, 12, 1, 0, 7], [90, 12, 5, 0, 39], 40, 8),  # mixed, with an idle slot
        ([1, 1, 30], [300, 129, 330], 70, 24),  # cached contexts spanning several 128-key blocks
        ([70, 1, 45], [70, 77, 60], 40, 8),  # chunks spanning several 32-token query tiles
        ([5, 40, 3, 64], [9, 40, 3, 100], 40, 8),  # sequences straddling tile boundaries at odd offsets
    ],
)
@pytest.mark.parametrize("single_pass_tokens", [0, 1024], ids=["two-part", "single-pass"])
def test_matches_reference(q_lens, kv_lens, pages, width, single_pass_tokens, monkeypatch):
    """Both ways of reading a step's own tokens (tiles over the step, or pages like the cached context)."""
    monkeypatch.setattr(xla_attention, "SINGLE_PASS_TOKENS", single_pass_tokens)
    args = ragged_batch(np.random.default_rng(len(q_lens)), q_lens, kv_lens, pages=pages, width=width)
    ours = np.asarray(jax.jit(xla_ragged_paged_attention, static_argnames="sm_scale")(*args, sm_scale=0.2))
    ref = np.asarray(ragged_paged_attention_reference(*args, sm_scale=0.2))
    live = sum(q_lens)
    assert np.isfinite(ours).all()
    np.testing.assert_allclose(ours[:live], ref[:live], rtol=1e-5, atol=1e-5)
    assert (ours[live:] == 0).all()
