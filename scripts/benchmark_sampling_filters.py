"""The sampling filters (top-k / top-p / min-p) alone: the former sort-based path vs the current one.

    python scripts/benchmark_sampling_filters.py [--rows 1 8 32 256] [--vocab 49152] [--repeats 7]

Random normal logits (a flat distribution: the nucleus holds most of the vocabulary, the worst case
for a sort's cumulative sum and the same work for the bisection). Every row asks for top-p 0.9,
every other row also for top-k 50. Both paths are jitted and warmed, then run alternately
`--repeats` times; the medians, their ratio and the number of rows whose kept sets differ are
reported (they differ only where float32 rounding puts a boundary token on the other side, or where
the sort path dropped tokens of probability ~0 in a row with top_p = 1, which has none here).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def sorted_filters(scaled, p):
    """The former `jaxinfer.sampling._apply_filters`: one descending sort per row, softmax, cumsum."""
    import jax
    import jax.numpy as jnp

    vocab = scaled.shape[-1]
    sorted_logits = -jnp.sort(-scaled, axis=-1)
    rank = jnp.arange(vocab)[None, :]
    k = jnp.where(p.top_k > 0, jnp.minimum(p.top_k, vocab), vocab)[:, None]
    keep = rank < k
    probs = jax.nn.softmax(jnp.where(keep, sorted_logits, -jnp.inf), axis=-1)
    before = jnp.cumsum(probs, axis=-1) - probs
    keep &= before < p.top_p[:, None]
    keep &= probs >= p.min_p[:, None] * probs[:, :1]
    count = jnp.maximum(jnp.sum(keep, axis=-1), 1)
    cutoff = jnp.take_along_axis(sorted_logits, (count - 1)[:, None], axis=-1)
    return jnp.where(scaled >= cutoff, scaled, -jnp.inf)


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 8, 32, 256])
    ap.add_argument("--vocab", type=int, default=49152)
    ap.add_argument("--top-p", type=float, default=0.9)
    ap.add_argument("--top-k", type=int, default=50, help="for every other row")
    ap.add_argument("--repeats", type=int, default=7)
    args = ap.parse_args(argv)

    import jax
    import jax.numpy as jnp
    import numpy as np

    from jaxinfer.sampling import SamplingArrays, _apply_filters

    paths = {"sort": jax.jit(sorted_filters), "bisection": jax.jit(_apply_filters)}
    rng = np.random.default_rng(0)
    results = []
    print(f"vocab {args.vocab}, top_p {args.top_p}, top_k {args.top_k} on every other row, {jax.devices()[0].platform}")
    print(f"{'rows':>5} {'sort ms':>9} {'bisection ms':>13} {'speed-up':>9} {'rows differing':>15}")
    for rows in args.rows:
        logits = jnp.asarray(rng.standard_normal((rows, args.vocab)), jnp.float32)
        p = SamplingArrays.neutral(
            rows, temperature=1.0, top_p=args.top_p, top_k=np.where(np.arange(rows) % 2, args.top_k, 0)
        )
        kept = {name: np.isfinite(np.asarray(f(logits, p))) for name, f in paths.items()}  # warm-up
        times = {name: [] for name in paths}
        for _ in range(args.repeats):
            for name, f in paths.items():
                start = time.perf_counter()
                f(logits, p).block_until_ready()
                times[name].append(time.perf_counter() - start)
        sort_ms, bisect_ms = (1e3 * statistics.median(times[name]) for name in paths)
        differing = int((kept["sort"] != kept["bisection"]).any(axis=-1).sum())
        results.append(dict(rows=rows, sort_ms=sort_ms, bisection_ms=bisect_ms, differing_rows=differing))
        print(f"{rows:>5} {sort_ms:>9.1f} {bisect_ms:>13.1f} {sort_ms / bisect_ms:>8.1f}x {differing:>15}")
    return results


if __name__ == "__main__":
    main()
