"""The native CPU linear layer (jaxinfer.native.matmul) against a float64 numpy oracle, for every weight
format: float32, bfloat16, per-channel int8, grouped int4 / uint4 with and without offset, with ragged
last groups and odd sizes (4-bit rows starting mid-byte); inside jit, under shard_map on a 2-device
mesh, batch-invariant bit for bit; the XLA fallback; and the builds without AVX-512 and without AVX512-VBMI."""

import os
import platform
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from jaxinfer.native import matmul

pytestmark = pytest.mark.skipif(not matmul.available(), reason=f"native linear: {matmul.unavailable_reason()}")

CODES = {"int8": (-128, 128), "int4": (-8, 8), "uint4": (0, 16)}


def make_weight(rng, fmt, out, inputs, group, with_offset):
    """(values, scale, offset) in the quantized representation, and the exact weight in float64."""
    if fmt in ("float32", "bfloat16"):
        values = jnp.asarray(rng.standard_normal((out, inputs)), fmt)
        return values, None, None, np.asarray(values, np.float64)
    lo, hi = CODES[fmt]
    codes = rng.integers(lo, hi, (out, inputs))
    groups = -(-inputs // group)
    scale = rng.uniform(0.01, 0.1, (out, groups)).astype(np.float32)
    offset = rng.normal(0, 0.1, (out, groups)).astype(np.float32) if with_offset else None
    per_input = lambda a: np.repeat(a.astype(np.float64), group, axis=1)[:, :inputs]  # noqa: E731
    exact = codes * per_input(scale) + (per_input(offset) if with_offset else 0)
    values = jnp.asarray(codes, getattr(jnp, fmt))
    return values, jnp.asarray(scale), None if offset is None else jnp.asarray(offset), exact


def check(y, x, exact):
    """y against x @ exact.T in float64, within float32 accumulation error, plus bf16 rounding of y."""
    xs = np.asarray(x, np.float64)
    want = xs @ exact.T
    bound = np.abs(xs) @ np.abs(exact).T  # what the rounding errors of the sum scale with
    got = np.asarray(y.astype(jnp.float32), np.float64)
    tol = 1e-5 * bound + (2.0**-8 * np.abs(want) if y.dtype == jnp.bfloat16 else 0)
    assert y.shape == want.shape
    assert (np.abs(got - want) <= tol).all(), np.max(np.abs(got - want) / (bound + 1e-30))


FORMATS = [
    # fmt, group (None: per channel), offset
    ("float32", None, False),
    ("bfloat16", None, False),
    ("int8", None, False),
    ("int4", 32, False),
    ("int4", 64, True),
    ("int4", 128, False),
    ("uint4", 32, True),
    ("uint4", 128, True),
    ("uint4", 64, False),
]
SHAPES = [(1, 37, 200), (2, 21, 77), (5, 64, 576), (13, 19, 77)]  # N, O, I: ragged groups, odd I (4-bit rows mid-byte)


@pytest.mark.parametrize("x_dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize(
    "fmt,group,with_offset", FORMATS, ids=[f"{f}-g{g}{'-off' if o else ''}" for f, g, o in FORMATS]
)
def test_matches_float64_oracle_in_jit(fmt, group, with_offset, x_dtype):
    rng = np.random.default_rng(hash((fmt, group, with_offset)) % 2**32)
    fn = jax.jit(matmul.linear, static_argnames="group")
    for n, out, inputs in SHAPES:
        values, scale, offset, exact = make_weight(rng, fmt, out, inputs, group or inputs, with_offset)
        x = jnp.asarray(rng.standard_normal((n, inputs)), x_dtype)
        y = fn(x, values, scale, offset, group=group)
        assert y.dtype == x.dtype
        check(y, x, exact)


# int4 with offsets; int8 with one scale per row (the codes' dot products scaled after, every path); int8
# in groups; bfloat16 (read in registers for one or two tokens, else decoded into a scratch row)
INVARIANT = [("int4", 32, True), ("int8", None, False), ("int8", 32, False), ("bfloat16", None, False)]


@pytest.mark.parametrize("fmt,group,with_offset", INVARIANT, ids=[f"{f}-g{g}" for f, g, _ in INVARIANT])
def test_each_token_row_is_independent_of_the_batch_bit_for_bit(fmt, group, with_offset):
    """Row n of a call on N tokens equals the call on token n alone: calls of 1-4 tokens (weights read in
    registers, two tokens a pass), tiles of 3-6 tokens over scratch rows, and the 8- and 4-row tiles all
    compute an element the same way."""
    rng = np.random.default_rng(1)
    values, scale, offset, _ = make_weight(rng, fmt, 45, 150, group or 150, with_offset)
    x = jnp.asarray(rng.standard_normal((300, 150)), jnp.float32)  # past one 256-token block
    fn = jax.jit(matmul.linear, static_argnames="group")
    full = np.asarray(fn(x, values, scale, offset, group=group))
    for lo, hi in [(0, 1), (7, 9), (20, 23), (40, 44), (100, 105), (290, 300)]:
        np.testing.assert_array_equal(np.asarray(fn(x[lo:hi], values, scale, offset, group=group)), full[lo:hi])


@pytest.mark.parametrize("n", [1, 2, 7])
def test_several_weights_in_one_call_equal_one_call_each(n):
    """`linears`: weights of different formats, groups and output sizes (one of them 3 rows, less than a
    row block) in one kernel call; each y equals its own `linear` call bit for bit and the oracle."""
    rng = np.random.default_rng(5)
    specs = [("int8", 45, None, False), ("bfloat16", 3, None, False), ("uint4", 70, 32, True), ("int8", 19, 32, False)]
    weights = [make_weight(rng, fmt, out, 96, group or 96, off) for fmt, out, group, off in specs]
    x = jnp.asarray(rng.standard_normal((n, 96)), jnp.float32)
    groups = [g for _, _, g, _ in specs]
    arrays = [(v, s, o) for v, s, o, _ in weights]
    together = jax.jit(lambda x, ws: matmul.linears(x, [(*w, g) for w, g in zip(ws, groups)]))(x, arrays)
    assert len(together) == len(specs)
    for y, (v, s, o, exact), (_, _, g, _) in zip(together, weights, specs):
        alone = jax.jit(matmul.linear, static_argnames="group")(x, v, s, o, group=g)
        np.testing.assert_array_equal(np.asarray(y), np.asarray(alone))
        check(y, x, exact)


@pytest.mark.parametrize("fmt", ["int4", "uint4"])
def test_4bit_values_made_inside_jit(fmt):
    """A 4-bit array XLA computes in the same program (not a parameter) reaches the kernel packed too."""
    rng = np.random.default_rng(4)
    _, scale, _, _ = make_weight(rng, fmt, 11, 51, 32, False)
    lo, hi = CODES[fmt]
    codes = rng.integers(lo, hi, (11, 51)).astype(np.int8)
    x = jnp.asarray(rng.standard_normal((3, 51)), jnp.float32)
    fn = jax.jit(lambda x, c, s: matmul.linear(x, c.astype(getattr(jnp, fmt)), s, group=32))
    exact = codes * np.repeat(np.asarray(scale, np.float64), 32, axis=1)[:, :51]
    check(fn(x, jnp.asarray(codes), scale), x, exact)


def test_under_shard_map_with_output_channels_split():
    """Per shard, as a tensor-parallel layer calls it: each device's int4 rows (packed per shard, an odd
    input length so rows start mid-byte) against its slice of the output."""
    rng = np.random.default_rng(2)
    values, scale, offset, exact = make_weight(rng, "uint4", 34, 99, 32, True)
    x = jnp.asarray(rng.standard_normal((6, 99)), jnp.float32)
    mesh = Mesh(np.array(jax.devices()[:2]), ("tensor",))
    fn = jax.jit(
        jax.shard_map(
            lambda x, v, s, o: matmul.linear(x, v, s, o, group=32),
            mesh=mesh,
            in_specs=(P(), P("tensor", None), P("tensor", None), P("tensor", None)),
            out_specs=P(None, "tensor"),
        )
    )
    check(fn(x, values, scale, offset), x, exact)


def test_xla_fallback_has_the_same_contract(monkeypatch):
    rng = np.random.default_rng(3)
    values, scale, offset, exact = make_weight(rng, "int4", 21, 70, 32, True)
    x = jnp.asarray(rng.standard_normal((3, 2, 70)), jnp.bfloat16)  # leading dims are kept
    native_y = matmul.linear(x, values, scale, offset, group=32)
    monkeypatch.setattr(matmul, "unavailable_reason", lambda: "no C++ compiler")
    y = jax.jit(matmul.linear, static_argnames="group")(x, values, scale, offset, group=32)
    assert y.shape == (3, 2, 21) and y.dtype == jnp.bfloat16
    check(y.reshape(6, 21), x.reshape(6, 70), exact)
    assert (
        np.abs(np.asarray(y, np.float32) - np.asarray(native_y, np.float32)).max()
        <= 2.0**-7 * np.abs(np.asarray(native_y, np.float32)).max()
    )


@pytest.mark.parametrize(
    "args,message",
    [
        (dict(x=(4, 10), values=(3, 11, "int8"), scale=(3, 1)), "values shape (3, 11) is not [O, I] with I = "),
        (dict(x=(4, 10), values=(3, 10, "int8"), scale=None), "scale must be float32 [O=3, groups]"),
        (dict(x=(4, 10), values=(3, 10, "int4"), scale=(3, 2)), "group is required when scale has 2 groups"),
        (
            dict(x=(4, 10), values=(3, 10, "int4"), scale=(3, 2), group=4),
            "scale shape (3, 2) does not fit group 4: want [3, ceil(10/4)]",
        ),
        (dict(x=(4, 10), values=(3, 10, "float32"), scale=(3, 1)), "float32 values take no scale"),
        (dict(x=(4, 10), values=(3, 10, "int16"), scale=(3, 1)), "values dtype int16 is not"),
    ],
)
def test_wrong_arguments_are_one_line(args, message):
    x = jnp.zeros(args["x"], jnp.float32)
    o, i, dt = args["values"]
    values = jnp.zeros((o, i), dt)
    scale = None if args["scale"] is None else jnp.ones(args["scale"], jnp.float32)
    with pytest.raises(ValueError, match="^linear: " + re.escape(message)):
        matmul.linear(x, values, scale, group=args.get("group"))


VARIANTS = """
import jax, jax.numpy as jnp, numpy as np
from jaxinfer import native
from jaxinfer.native import matmul
rng = np.random.default_rng(0)
codes = rng.integers(-8, 8, (9, 42)); scale = rng.uniform(0.01, 0.1, (9, 2)).astype(np.float32)
exact = codes * np.repeat(scale.astype(np.float64), 32, axis=1)[:, :42]
base = native.FLAGS
for flag in ("-mno-avx512f", "-mno-avx512vbmi"):  # no AVX-512 at all; AVX-512 without vpmultishiftqb
    native.FLAGS = (*base, flag)
    native.load_library.cache_clear()
    lib = native.load_library("matmul.cc")
    matmul.TARGET = "jaxinfer_linears" + flag.replace("-", "_")
    jax.ffi.register_ffi_target(matmul.TARGET, jax.ffi.pycapsule(lib.JaxinferLinears), platform="cpu")
    for n in (1, 3):  # the in-register readers and the scratch path
        x = rng.standard_normal((n, 42)).astype(np.float32)
        y = matmul.linear(jnp.asarray(x), jnp.asarray(codes, jnp.int4), jnp.asarray(scale), group=32)
        print(flag, n, np.abs(np.asarray(y, np.float64) - x.astype(np.float64) @ exact.T).max())
"""


@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="x86 compiler flags")
def test_builds_without_avx512_and_without_vbmi():
    """The same source built with -mno-avx512f (its plain loops) and with -mno-avx512vbmi (AVX-512 but no
    4-bit readers), each loaded in a fresh process under its own target; the libraries are cached under
    their own names (the flags are part of them), so only the first run compiles."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run([sys.executable, "-c", VARIANTS], capture_output=True, text=True, timeout=180, cwd=root)
    assert out.returncode == 0, out.stderr[-2000:]
    rows = [line.split() for line in out.stdout.splitlines() if line.startswith("-mno")]
    assert [r[:2] for r in rows] == [[f, n] for f in ("-mno-avx512f", "-mno-avx512vbmi") for n in ("1", "3")]
    assert all(float(r[2]) < 1e-5 for r in rows), rows
