"""Linear layers alone: the native CPU kernel (jaxinfer.native.matmul) vs XLA's own paths, alternating.

    python scripts/benchmark_matmul.py [--n 1 8 32 256] [--layers 30] [--paths xla-f32 native-int8 ...]

One case is every projection of a model at N tokens in one jitted function: `--layers` layers of
SmolLM2-135M's q [576->576], k and v [576->192], o [576->576], gate and up [576->1536] and down
[1536->576], plus the lm_head [576->49152] (each layer its own random weights, so nothing stays in
cache between layers unless the whole model fits). Each path runs alternately `--repeats` times after
a warm-up; reported: the median wall time and GFLOP/s (2 N x parameters) and GB/s (weight bytes read
once) from it, and the median process CPU time (all threads): on a shared machine the wall time
depends on the neighbours, the CPU time much less (CPU time above wall time: more than one core used).

Paths (activation dtype / weight storage): xla-f32, xla-bf16 (bf16 x bf16, f32 accumulation),
xla-int8 (per-channel scale, dequantize then dot, f32 x), xla-int4 (group 128); the native kernel's
native-f32, native-bf16, native-int8 and native-int4 with f32 activations, and native-bf16x-int8 and
native-bf16x-int4 with bf16 activations. Each native path is also checked against its XLA twin on
the same weights (the largest difference, relative to the largest output). Run it with XLA_FLAGS (e.g.
--xla_cpu_experimental_ynn_fusion_type=dot) to measure XLA's flag-gated paths.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

LAYER = [("q", 576, 576), ("k", 192, 576), ("v", 192, 576), ("o", 576, 576), ("gate", 1536, 576), ("up", 1536, 576)]
DOWN = ("down", 576, 1536)
GROUP4 = 128
# path: (activation dtype, weight format)
PATHS = {
    "xla-f32": ("float32", "f32"),
    "xla-bf16": ("bfloat16", "bf16"),
    "xla-int8": ("float32", "int8"),
    "xla-int4": ("float32", "int4"),
    "native-f32": ("float32", "f32"),
    "native-bf16": ("bfloat16", "bf16"),
    "native-int8": ("float32", "int8"),
    "native-int4": ("float32", "int4"),
    "native-bf16x-int8": ("bfloat16", "int8"),
    "native-bf16x-int4": ("bfloat16", "int4"),
}
BYTES = {"f32": 4.0, "bf16": 2.0, "int8": 1.0, "int4": 0.5}


def shapes(layers: int, vocab: int) -> list[tuple[str, int, int]]:
    return [s for _ in range(layers) for s in (*LAYER, DOWN)] + [("lm_head", vocab, 576)]


def make_weights(fmt: str, shape_list, seed: int = 0):
    """One (values, scale) per projection, in the format's storage (int4: groups of GROUP4)."""
    import jax.numpy as jnp
    import numpy as np

    rng = np.random.default_rng(seed)
    out = []
    for _, o, i in shape_list:
        if fmt in ("f32", "bf16"):
            w = rng.standard_normal((o, i), np.float32) * 0.05
            out.append((jnp.asarray(w, jnp.float32 if fmt == "f32" else jnp.bfloat16), None))
        elif fmt == "int8":
            v = rng.integers(-127, 128, (o, i), dtype=np.int8)
            out.append((jnp.asarray(v), jnp.asarray(rng.random((o, 1), np.float32) * 0.01)))
        else:
            v = rng.integers(-8, 8, (o, i), dtype=np.int8)
            groups = -(-i // GROUP4)
            out.append((jnp.asarray(v, jnp.int4), jnp.asarray(rng.random((o, groups), np.float32) * 0.01)))
    return out


def model_fn(path: str, shape_list, feature_major: bool = False):
    """(x576, x1536, weights) -> every projection's output, through the path's implementation. With
    feature_major the XLA paths get x as [I, N] and compute `w @ x` -> [O, N] (jaxinfer's CPU layout for
    few tokens); the native kernel always takes [N, I]."""
    import jax
    import jax.numpy as jnp

    from jaxinfer.native import matmul

    def one(x, values, scale, group):
        if path.startswith("native"):
            return matmul.linear(x, values, scale, group=group)
        w = values if scale is None else matmul.dequantize(values, scale, group=group)
        if feature_major:
            return jnp.dot(w, x.astype(w.dtype), preferred_element_type=jnp.float32).astype(x.dtype)
        return jnp.dot(x.astype(w.dtype), w.T, preferred_element_type=jnp.float32).astype(x.dtype)

    group = GROUP4 if PATHS[path][1] == "int4" else None

    def run(x576, x1536, weights):
        return [one(x1536 if i == 1536 else x576, v, s, group or i) for (v, s), (_, _, i) in zip(weights, shape_list)]

    return jax.jit(run)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n", type=int, nargs="+", default=[1, 8, 32, 256], help="tokens per call")
    p.add_argument("--layers", type=int, default=30)
    p.add_argument("--vocab", type=int, default=49152, help="lm_head rows")
    p.add_argument("--paths", nargs="+", default=list(PATHS), choices=list(PATHS))
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument(
        "--xla-feature-major", action="store_true", help="XLA paths compute w @ x with x [I, N] (see model_fn)"
    )
    args = p.parse_args(argv)

    import jax
    import jax.numpy as jnp
    import numpy as np

    from jaxinfer.native import matmul

    shape_list = shapes(args.layers, args.vocab)
    params = sum(o * i for _, o, i in shape_list)
    print(f"{len(shape_list)} projections, {params / 1e6:.1f} M parameters; native kernel: {matmul.available()}")
    weights = {fmt: make_weights(fmt, shape_list) for fmt in sorted({PATHS[q][1] for q in args.paths})}
    fns = {q: model_fn(q, shape_list, args.xla_feature_major) for q in args.paths}
    results = {}
    rng = np.random.default_rng(1)
    for n in args.n:
        xs = {
            dt: (jnp.asarray(rng.standard_normal((n, 576)), dt), jnp.asarray(rng.standard_normal((n, 1536)), dt))
            for dt in ("float32", "bfloat16")
        }
        inputs = {  # each path's (x576, x1536) in its layout
            q: tuple(a.T for a in xs[PATHS[q][0]])
            if args.xla_feature_major and q.startswith("xla")
            else xs[PATHS[q][0]]
            for q in args.paths
        }
        times = {q: [] for q in args.paths}
        cpu = {q: [] for q in args.paths}
        for q in args.paths:  # warm-up: compile
            jax.block_until_ready(fns[q](*inputs[q], weights[PATHS[q][1]]))
        for _ in range(args.repeats):
            for q in args.paths:
                start, start_cpu = time.perf_counter(), time.process_time()
                jax.block_until_ready(fns[q](*inputs[q], weights[PATHS[q][1]]))
                times[q].append(time.perf_counter() - start)
                cpu[q].append(time.process_time() - start_cpu)
        for q in args.paths:
            t = statistics.median(times[q])
            gflops = 2 * n * params / t / 1e9
            gbs = params * BYTES[PATHS[q][1]] / t / 1e9
            c = statistics.median(cpu[q])
            results[(n, q)] = {"ms": t * 1e3, "cpu_ms": c * 1e3, "gflops": gflops, "gbs": gbs}
            print(
                f"N={n:<4} {q:<18} {t * 1e3:9.2f} ms  {gflops:7.1f} GFLOP/s  {gbs:6.1f} GB/s of weights"
                f"  (CPU {c * 1e3:9.2f} ms)"
            )
        for fmt_path in (q for q in args.paths if q.startswith("native")):  # the same weights through XLA
            twin = "xla-" + fmt_path.split("-")[-1]
            if twin in args.paths and PATHS[twin] == PATHS[fmt_path]:
                got = fns[fmt_path](*inputs[fmt_path], weights[PATHS[twin][1]])
                want = fns[twin](*inputs[twin], weights[PATHS[twin][1]])
                if args.xla_feature_major:
                    want = [b.T for b in want]
                diff = max(
                    float(jnp.max(jnp.abs(a.astype(jnp.float32) - b.astype(jnp.float32))) / jnp.max(jnp.abs(b)))
                    for a, b in zip(got, want)
                )
                results[(n, fmt_path)]["max_rel_diff"] = diff
                print(f"N={n:<4} {fmt_path} vs {twin}: largest difference {diff:.1e} of the largest output")
    return results


if __name__ == "__main__":
    main()
