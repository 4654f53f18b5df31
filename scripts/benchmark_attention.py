"""Paged attention alone: the native CPU kernel vs the XLA path, alternating, on one cache.

    python scripts/benchmark_attention.py [--batch 32] [--context 16 48 256 1024] [--q-len 1] [--layers 30]
                                          [--kv-dtype float32 int8 float8_e4m3fn]

Each case chains `--layers` attention calls in one jitted function (like a decode step's layers,
each layer its own cache array of `--pages` random pages), SmolLM2-135M's heads by default (9 query
/ 3 KV heads of 64). The implementations run alternately `--repeats` times after a warm-up; the
median of each, their ratio, the K/V bytes each call reads and the largest difference between the two
outputs are reported (they compute the same thing: a difference above 1e-4 is a bug). With several
`--kv-dtype`s (the cache's storage; default: --dtype), each case's random K/V is stored in each of them
(quantized as the engine writes it) and every (kv dtype, implementation) pair alternates with the others.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batch", type=int, nargs="+", default=[32])
    p.add_argument("--context", type=int, nargs="+", default=[16, 48, 256, 1024])
    p.add_argument("--q-len", type=int, default=1, help="query tokens per sequence (1 = decode)")
    p.add_argument("--layers", type=int, default=30)
    p.add_argument("--heads", type=int, nargs=2, default=[9, 3], metavar=("Q", "KV"))
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--page-size", type=int, default=16)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument(
        "--kv-dtype",
        nargs="+",
        default=None,
        choices=["float32", "bfloat16", "int8", "float8_e4m3fn", "float8_e5m2"],
        help="cache storage dtypes to compare (default: --dtype)",
    )
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)

    import jax
    import jax.numpy as jnp
    import numpy as np

    from jaxinfer import native
    from jaxinfer.engine.xla_attention import xla_ragged_paged_attention
    from jaxinfer.perf import write_report
    from pallas_kernels.ragged_paged_attention.quantized import page_rows, write_tokens

    if not native.available():
        raise SystemExit(f"benchmark_attention: the native kernel is unavailable: {native.unavailable_reason()}")
    hq, hk = args.heads
    d, page, dtype = args.head_dim, args.page_size, jnp.dtype(args.dtype)
    kv_dtypes = [jnp.dtype(k) for k in args.kv_dtype or [args.dtype]]

    def stored(x, kv_dtype):  # float [pages, page, 2Hk, D] -> the cache in kv_dtype, written as the engine does
        n = x.shape[0]
        empty = jnp.zeros((n, page_rows(page, d, kv_dtype), 2 * hk, d), kv_dtype)
        ids, offsets = jnp.repeat(jnp.arange(n), page), jnp.tile(jnp.arange(page), n)
        return jax.jit(write_tokens)(empty, ids, offsets, x.reshape(n * page, 2 * hk, d))

    rng = np.random.default_rng(0)
    rows = []
    for batch in args.batch:
        for context in args.context:
            if args.q_len > context:
                raise SystemExit(f"--q-len {args.q_len} is longer than --context {context}")
            width = -(-context // page)
            pages = batch * width + 1
            floats = [jnp.asarray(rng.standard_normal((pages, page, 2 * hk, d)), dtype) for _ in range(args.layers)]
            table = jnp.asarray(rng.permutation(pages)[: batch * width].reshape(batch, width), jnp.int32)
            q = jnp.asarray(rng.standard_normal((batch * args.q_len, hq, d)), dtype)
            kv_lens = jnp.full((batch,), context, jnp.int32)
            cu = jnp.arange(batch + 1, dtype=jnp.int32) * args.q_len
            seqs = jnp.array([batch], jnp.int32)

            def chain(use_native):
                def run(q, caches):
                    for cache in caches:  # each layer's output is the next one's query, as in a model
                        q = xla_ragged_paged_attention(
                            q,
                            cache,
                            kv_lens,
                            table,
                            cu,
                            seqs,
                            sm_scale=d**-0.5,
                            native=use_native,
                        )
                    return q

                return jax.jit(run)

            caches = {kv: [stored(x, kv) for x in floats] for kv in kv_dtypes}
            fns = {(kv, impl): chain(impl == "native") for kv in kv_dtypes for impl in ("native", "xla")}
            outs = {k: np.asarray(f(q, caches[k[0]]), np.float32) for k, f in fns.items()}  # compile + warm up
            times = {k: [] for k in fns}
            for _ in range(args.repeats):
                for k, f in fns.items():
                    start = time.perf_counter()
                    f(q, caches[k[0]]).block_until_ready()
                    times[k].append(time.perf_counter() - start)
            ms = {k: 1e3 * statistics.median(v) for k, v in times.items()}
            for kv in kv_dtypes:
                row = dict(
                    batch=batch,
                    context=context,
                    q_len=args.q_len,
                    layers=args.layers,
                    kv_dtype=kv.name,
                    native_ms=ms[kv, "native"],
                    xla_ms=ms[kv, "xla"],
                    speedup=ms[kv, "xla"] / ms[kv, "native"],
                    kv_bytes_per_layer=batch * context * 2 * hk * d * kv.itemsize * page_rows(page, d, kv) // page,
                    max_abs_difference=float(np.max(np.abs(outs[kv, "native"] - outs[kv, "xla"]))),
                )
                rows.append(row)
                print(
                    f"batch {batch:3d} context {context:5d} q_len {args.q_len} kv {kv.name:13s}: native "
                    f"{row['native_ms']:8.2f} ms  xla {row['xla_ms']:8.2f} ms  speedup {row['speedup']:5.2f}x  "
                    f"max |diff| {row['max_abs_difference']:.1e}",
                    flush=True,
                )
    result = dict(
        device=jax.devices()[0].device_kind,
        jax=jax.__version__,
        heads=[hq, hk],
        head_dim=d,
        page_size=page,
        dtype=args.dtype,
        kv_dtypes=[k.name for k in kv_dtypes],
        results=rows,
    )
    return write_report(result, args.json)


if __name__ == "__main__":
    main()
