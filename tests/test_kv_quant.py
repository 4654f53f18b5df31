"""Quantized KV caches (int8 with per-(token, kv-head) scales in the page; fp8 e4m3fn / e5m2 with and
without per-tensor k/v scales) in every attention path, against a dequantize-then-reference oracle: the
pages are built here with numpy from the format's description, dequantized with numpy, and JAX's own
`ref_ragged_paged_attention` runs on the float pages. Caches are hostile as in
test_ragged_paged_attention: unused pages, slots and page-table entries hold NaN (int8: NaN scales), so
a stray read shows up in the output. Also: quantize-on-write, the static-input checks, and AOT compiles
of the int8 kernel for TPU v5e and v6e.
"""

import functools

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from jax.experimental.pallas import tpu as pltpu
from jax.experimental.pallas.ops.tpu.ragged_paged_attention import ref_ragged_paged_attention, static_validate_inputs

from jaxinfer import native
from jaxinfer.engine import xla_attention
from pallas_kernels.ragged_paged_attention import ragged_paged_attention, ragged_paged_attention_reference
from pallas_kernels.ragged_paged_attention.quantized import dequantize_pages, write_tokens
from tests.test_ragged_paged_attention import make_case

SM = 0.125
FP8 = {"float8_e4m3fn": ml_dtypes.float8_e4m3fn, "float8_e5m2": ml_dtypes.float8_e5m2}


def pack_int8(values, scales):
    """numpy, from the format's description (quantized.py's docstring): int8 values [P, page, C, D] and
    float32 scales [P, page, C] -> int8 pages [P, page + E, C, D], E = ceil(4 page / D) rows in which
    token t's scale of head c is bytes 4t .. 4t+3 (least significant first) of the head's trailer."""
    n, page, c, d = values.shape
    e = -(-4 * page // d)
    trailer = np.zeros((n, c, e * d), np.uint8)
    raw = np.ascontiguousarray(scales, "<f4").transpose(0, 2, 1)  # [P, C, page], little-endian
    trailer[:, :, : 4 * page] = np.ascontiguousarray(raw).view(np.uint8).reshape(n, c, 4 * page)
    out = np.zeros((n, page + e, c, d), np.int8)
    out[:, :page] = values
    out[:, page:] = trailer.reshape(n, c, e, d).transpose(0, 2, 1, 3).view(np.int8)
    return out


def quantized_case(seed, q_lens, kv_lens, *, kv_dtype, k_scale=None, v_scale=None, q_dtype=np.float32, **shape):
    """(args with the quantized cache, args with its float32 dequantization, number of real query rows)."""
    args, n = make_case(seed, q_lens, kv_lens, dtype=jnp.float32, **shape)
    kv = np.asarray(args[1])  # float32 [P, page, C, D], NaN where nothing lives
    dead = np.isnan(kv[..., 0])  # [P, page, C]
    if kv_dtype == "int8":
        absmax = np.abs(np.where(np.isnan(kv), 0, kv)).max(-1)
        scales = np.where(dead, np.nan, absmax / 127).astype(np.float32)  # poison: NaN scales
        with np.errstate(invalid="ignore"):
            values = np.where(dead[..., None], 0, np.round(kv / np.where(dead, 1, scales)[..., None]))
        cache = jnp.asarray(pack_int8(values.astype(np.int8), scales))
        deq = values * scales[..., None]
    else:
        per_head = np.tile([k_scale or 1.0, v_scale or 1.0], kv.shape[2] // 2).astype(np.float32)[:, None]
        stored = (kv / per_head).astype(FP8[kv_dtype])  # NaN stays NaN in both formats
        cache = jnp.asarray(stored)
        deq = stored.astype(np.float32) * per_head
    q = args[0].astype(q_dtype)
    return (q, cache) + args[2:], (q, jnp.asarray(deq, jnp.float32)) + args[2:], n


def jax_reference(args, n, **scales):
    """JAX's `ref_ragged_paged_attention`, jitted with the batch layout as constants (its per-sequence loop
    and slices need them concrete; eagerly it takes seconds here)."""
    q, kv, *layout = args
    layout = [np.asarray(a) for a in layout]
    fn = jax.jit(lambda q, kv: ref_ragged_paged_attention(q, kv, *layout, sm_scale=SM, **scales))
    return np.asarray(fn(q, kv), np.float32)[:n]


def oracle(float_args, n):
    """Dequantize-then-reference: JAX's reference on the dequantized float32 pages."""
    return jax_reference(float_args, n)


# id, kv dtype, per-tensor (k, v) scales, q dtype, q_lens, kv_lens, Hq, Hk, D, page
CASES = [
    ("int8-mixed", "int8", (None, None), np.float32, [1, 9, 1, 5], [30, 9, 50, 20], 4, 2, 32, 16),
    ("int8-decode-bf16", "int8", (None, None), jnp.bfloat16, [1, 1, 1], [17, 40, 3], 4, 1, 64, 16),
    ("e4m3fn", "float8_e4m3fn", (None, None), np.float32, [1, 7, 1], [25, 7, 40], 4, 2, 32, 16),
    ("e4m3fn-scaled", "float8_e4m3fn", (0.25, 4.0), np.float32, [1, 7, 1], [25, 7, 40], 4, 2, 32, 16),
    ("e5m2", "float8_e5m2", (None, None), np.float32, [1, 7, 1], [25, 7, 40], 4, 2, 32, 16),
    ("e5m2-scaled", "float8_e5m2", (0.5, 2.0), np.float32, [1, 7, 1], [25, 7, 40], 4, 2, 32, 16),
]
TOL = {np.float32: 1e-5, jnp.bfloat16: 4e-2}  # max abs error; outputs are O(1)


# interpret mode costs seconds per case: each fp8 format and with/without scales once in each test, and
# all four combinations across the two
KERNEL_CASES = ("int8-mixed", "int8-decode-bf16", "e4m3fn-scaled", "e5m2")
XLA_CASES = ("int8-mixed", "int8-decode-bf16", "e4m3fn", "e5m2-scaled")


@functools.cache
def prepared(name):
    """(quantized args, n real rows, per-tensor scales, tolerance, the oracle's output) of CASES' `name`."""
    _, kv_dtype, (ks, vs), q_dtype, q_lens, kv_lens, hq, hk, d, page = next(c for c in CASES if c[0] == name)
    shape = dict(Hq=hq, Hk=hk, D=d, page_size=page)
    qa, fa, n = quantized_case(3, q_lens, kv_lens, kv_dtype=kv_dtype, k_scale=ks, v_scale=vs, q_dtype=q_dtype, **shape)
    return qa, n, dict(k_scale=ks, v_scale=vs), TOL[q_dtype], oracle(fa, n)


@pytest.mark.parametrize("name", KERNEL_CASES)
def test_kernel_interpret_equals_dequantize_then_reference(name):
    """The Pallas kernel in TPU interpret mode (small blocks: sequences span q blocks, several kv blocks)."""
    qa, n, scales, tol, want = prepared(name)
    out = ragged_paged_attention(
        *qa, sm_scale=SM, num_kv_pages_per_block=2, num_queries_per_block=8, interpret=pltpu.InterpretParams(), **scales
    )
    assert out.dtype == qa[0].dtype
    out = np.asarray(out, np.float32)[:n]
    assert np.isfinite(out).all()
    np.testing.assert_allclose(out, want, atol=tol, rtol=0)


@pytest.mark.parametrize("name", XLA_CASES)
def test_reference_and_xla_paths_equal_dequantize_then_reference(name, monkeypatch):
    """Our reference, the XLA path both ways (two parts / single pass) and the native CPU kernel."""
    qa, n, scales, tol, want = prepared(name)
    ours = jax.jit(functools.partial(ragged_paged_attention_reference, sm_scale=SM, **scales))(*qa)
    np.testing.assert_allclose(np.asarray(ours, np.float32)[:n], want, atol=tol)
    paths = [(False, 0), (False, 1024)] + ([(True, 0)] if native.available() else [])
    for use_native, single_pass_tokens in paths:
        monkeypatch.setattr(xla_attention, "SINGLE_PASS_TOKENS", single_pass_tokens)  # read while tracing:
        fn = jax.jit(
            functools.partial(xla_attention.xla_ragged_paged_attention, sm_scale=SM, native=use_native, **scales)
        )
        out = np.asarray(fn(*qa), np.float32)  # (a new partial each time: a new trace)
        assert np.isfinite(out[:n]).all() and (out[n:] == 0).all()
        np.testing.assert_allclose(out[:n], want, atol=tol, err_msg=f"native={use_native} {single_pass_tokens}")


def test_fp8_oracle_agrees_with_jax_reading_fp8_and_scales_itself():
    """The oracle's dequantization of fp8 pages with per-tensor scales is what JAX's reference does given the
    fp8 pages and k_scale / v_scale (without scales JAX's reference rounds probabilities to fp8, so not that)."""
    for name in ("e4m3fn-scaled", "e5m2-scaled"):
        qa, n, scales, tol, want = prepared(name)
        np.testing.assert_allclose(jax_reference(qa, n, **scales), want, atol=tol)


@pytest.mark.parametrize("dtype", ["int8", "float8_e4m3fn"])
def test_write_quantizes_as_numpy_does(dtype):
    """write_tokens into a stacked [layers, P, rows, C, D] cache: int8 values round(x / s), s = max|x| / 127 per
    (token, head), and the scale's bytes where pack_int8 puts them; fp8 saturates instead of making NaN; a page
    id out of range writes nothing."""
    rng = np.random.default_rng(0)
    page, c, d, pages = 16, 4, 32, 3
    rows = page + (4 * page // d if dtype == "int8" else 0)
    kv = rng.standard_normal((5, c, d)).astype(np.float32) * rng.uniform(0.1, 30, (5, c, 1)).astype(np.float32)
    kv[4] = 1000.0  # beyond e4m3fn's 448
    page_ids = np.array([2, 0, 0, 2, 9], np.int32)  # 9: dropped
    offsets = np.array([5, 0, 15, 6, 3], np.int32)
    cache = jnp.zeros((2, pages, rows, c, d), dtype)
    out = jax.jit(write_tokens)(cache, jnp.asarray(page_ids), jnp.asarray(offsets), jnp.asarray(kv), prefix=(1,))
    out = np.asarray(out)
    assert not out[0].any()  # layer 0 untouched
    if dtype == "int8":
        scales = np.zeros((pages, page, c), np.float32)
        values = np.zeros((pages, page, c, d), np.int8)
        for t in range(4):
            s = np.abs(kv[t]).max(-1) / 127
            scales[page_ids[t], offsets[t]] = s
            values[page_ids[t], offsets[t]] = np.round(kv[t] / s[:, None])
        np.testing.assert_array_equal(out[1], pack_int8(values, scales))
    else:
        want = np.zeros((pages, page, c, d), np.float32)
        for t in range(4):
            want[page_ids[t], offsets[t]] = kv[t].astype(ml_dtypes.float8_e4m3fn).astype(np.float32)
        np.testing.assert_array_equal(out[1].astype(np.float32), want)
        big = jax.jit(write_tokens)(cache[0], jnp.array([1]), jnp.array([0]), jnp.asarray(kv[4:]))
        assert (np.asarray(big, np.float32)[1, 0] == 448.0).all()
    deq = np.asarray(dequantize_pages(jnp.asarray(out[1])))
    for t in range(4):  # and it reads back within half a step of each vector's scale
        err = np.abs(deq[page_ids[t], offsets[t]] - kv[t]).max(-1)
        step = np.abs(kv[t]).max(-1) * (1 / 127 if dtype == "int8" else 2**-3)
        assert (err <= step / 2 * 1.0001).all()


# ------------------------------------------------------------------------------------ static inputs
def _small():
    args, _ = make_case(0, [1, 3], [5, 9], Hq=4, Hk=2, D=32, page_size=8)
    return args


def _paths():
    interp = functools.partial(ragged_paged_attention, interpret=True)
    return {
        "kernel": interp,
        "reference": ragged_paged_attention_reference,
        "xla": xla_attention.xla_ragged_paged_attention,
    }


BAD = [
    # id, change to args / kwargs, what JAX's static_validate_inputs does with it (None: not its check)
    ("soft_cap=0", lambda a: (a, dict(soft_cap=0.0)), "soft_cap"),
    ("sliding_window=0", lambda a: (a, dict(sliding_window=0)), "sliding_window"),
    ("sliding_window<0", lambda a: (a, dict(sliding_window=-4)), "sliding_window"),
    ("kv_lens-int16", lambda a: ((a[0], a[1], a[2].astype(jnp.int16)) + a[3:], {}), "dtype"),
    ("cu_q_lens-shape", lambda a: (a[:4] + (a[4][:-1],) + a[5:], {}), "cu_q_lens"),
    ("head_dim", lambda a: ((a[0][..., :16],) + a[1:], {}), "head_dim"),
    ("heads", lambda a: ((a[0][:, :3],) + a[1:], {}), "num_q_heads"),
    ("k_scale=0", lambda a: (a, dict(k_scale=0.0)), None),
    ("v_scale-int", lambda a: (a, dict(v_scale=2)), None),
    ("queries-int", lambda a: ((a[0].astype(jnp.int32),) + a[1:], {}), None),
    ("kv-int16", lambda a: ((a[0], a[1].astype(jnp.int16)) + a[2:], {}), None),
    ("int8-rows", lambda a: ((a[0], jnp.zeros((4, 10, 4, 32), jnp.int8)) + a[2:], {}), None),
]


WINDOW_CAP = ("soft_cap", "sliding_window")  # keyword arguments the XLA path does not take


@pytest.mark.parametrize(
    "bad,path",
    [(b, p) for b in BAD for p in _paths() if not (p == "xla" and b[0].startswith(WINDOW_CAP))],
    ids=[f"{b[0]}-{p}" for b in BAD for p in _paths() if not (p == "xla" and b[0].startswith(WINDOW_CAP))],
)
def test_static_inputs_refused_as_jax_refuses_them(bad, path):
    """Each refused with a ValueError naming the argument, at trace time, by every path; where JAX's own
    static_validate_inputs has the check, it refuses the same input."""
    name, change, jax_word = bad
    args, kwargs = change(_small())
    word = jax_word or name.split("=")[0].split("-")[0]
    fn = _paths()[path]
    call = functools.partial(fn, *args, sm_scale=SM, **kwargs)
    with pytest.raises(ValueError, match=word if word != "dtype" else "int32"):
        call()
    if jax_word is not None:
        with pytest.raises((ValueError, AssertionError)):
            static_validate_inputs(*args, **{k: v for k, v in kwargs.items()})


def test_block_size_arguments_are_checked():
    args = _small()
    for kw, word in (
        (dict(num_kv_pages_per_block=0), "num_kv_pages_per_block"),
        (dict(num_kv_pages_per_block=99), r"\(0, 3\]"),
        (dict(num_queries_per_block=0), "num_queries_per_block"),
        (dict(vmem_limit_bytes=-1), "vmem_limit_bytes"),
    ):
        with pytest.raises(ValueError, match=word):
            ragged_paged_attention(*args, sm_scale=SM, interpret=True, **kw)


# ------------------------------------------------------------------------------------- AOT for TPU
@pytest.mark.parametrize("topology", ["v5e:2x4", "v6e:2x4"])
def test_int8_kernel_compiles_for_tpu(topology):
    """The int8 ragged kernel inside shard_map (kv heads over tensor), compiled by Mosaic for the chip: a
    Llama-3-8B-shaped decode (8 kv heads, head_dim 128, page 16) over a 4,097-page cache. XLA keeps the
    cache where it is (no relayout copy: the kernel's temporaries stay small)."""
    from jax.experimental import topologies
    from jax.sharding import Mesh, NamedSharding
    from jax.sharding import PartitionSpec as P

    try:
        devices = topologies.get_topology_desc(platform="tpu", topology_name=topology).devices
    except Exception as e:  # libtpu missing or unusable
        pytest.skip(f"no TPU topology: {e}")
    mesh = Mesh(np.array(devices).reshape(2, 4), ("data", "tensor"))
    t, s, pps, hq, hk, d, page = 64, 64, 64, 32, 8, 128, 16
    specs = (P(None, "tensor", None), P(None, None, "tensor", None), P(), P(), P(), P())
    shapes = [
        ((t, hq, d), jnp.bfloat16),
        ((s * pps + 1, page + 1, 2 * hk, d), jnp.int8),  # 1 trailer row: 4 bytes x 16 tokens <= 128 lanes
        ((s,), jnp.int32),
        ((s, pps), jnp.int32),
        ((s + 1,), jnp.int32),
        ((1,), jnp.int32),
    ]
    fn = jax.shard_map(
        functools.partial(ragged_paged_attention, sm_scale=SM),
        mesh=mesh,
        in_specs=specs,
        out_specs=P(None, "tensor", None),
        check_vma=False,
    )
    abstract = [jax.ShapeDtypeStruct(sh, dt, sharding=NamedSharding(mesh, sp)) for (sh, dt), sp in zip(shapes, specs)]
    from jaxinfer.compilation.cache import persistent_cache_bypassed

    with persistent_cache_bypassed():  # an entry for a described (not attached) TPU cannot be read back
        compiled = jax.jit(fn).lower(*abstract).compile()
    assert "tpu_custom_call" in compiled.as_text()
    cache_shard = (s * pps + 1) * (page + 1) * 2 * hk // 4 * d
    assert compiled.memory_analysis().temp_size_in_bytes < cache_shard / 20
