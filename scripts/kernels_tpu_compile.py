#!/usr/bin/env python
"""AOT-compile the Pallas attention kernels for TPU topologies from a CPU-only host.

For each topology (default v5e:2x4, v5p:2x2x1, v6e:2x4) this builds a ('data', 'tensor')
mesh from `jax.experimental.topologies`, wraps each kernel in `jax.shard_map` with the
kv-head axis sharded on 'tensor', compiles it for TPU and prints: whether it compiled,
memory analysis (argument / output / temp / generated-code bytes) and cost analysis
(flops, bytes accessed and XLA's 'optimal_seconds' estimate). Shapes are Llama-3-8B
(32 q heads, 8 kv heads, head_dim 128, bf16, page 16):

* ragged paged attention, decode: 64 sequences x 1 token at context 2048 (also with an int8 KV cache,
  its per-token scales in each page);
* ragged paged attention, prefill: one 512-token chunk at the end of a 2048 context;
* ragged paged attention in sequence-shard mode (issue #21), the decode shape: the 'data' axis acts as
  the sequence axis (each of its shards holds every other page of each sequence, 2 sequence shards), the
  kernel returns its partial result and log-sum-exp, and `merge_over_axis` combines them, as the engine
  does on a mesh with sequence > 1;
* flash attention, prefill: a 512-token chunk at offset 1536 over 2048 keys;
* the plain-JAX reference for the decode shape, for comparison with the kernel.

A Pallas call is opaque to XLA, so its cost numbers are the kernels' own `CostEstimate`
(upper bounds from static shapes); the reference's are XLA's analysis of real HLO.

Reusable: `compile_for_topology(topology, fn, arg_specs, out_spec)` compiles any function
of sharded abstract arguments, so the whole decode step can be added later.

  python scripts/kernels_tpu_compile.py [--small] [--json OUT] [--topologies v5e:2x4 ...]
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys

os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import Mesh, NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P

from pallas_kernels.flash_attention import flash_attention  # noqa: E402
from pallas_kernels.ragged_paged_attention import ragged_paged_attention, ragged_paged_attention_reference  # noqa: E402
from pallas_kernels.ragged_paged_attention.merge import merge_over_axis  # noqa: E402
from pallas_kernels.ragged_paged_attention.quantized import page_rows  # noqa: E402

TOPOLOGIES = ("v5e:2x4", "v5p:2x2x1", "v6e:2x4")
COST_KEYS = ("flops", "transcendentals", "bytes accessed", "optimal_seconds")


def make_mesh(topology: str, tensor: int) -> Mesh:
    """('data', 'tensor') mesh over the topology's devices; tensor is capped by the count."""
    from jax.experimental import topologies

    devs = np.array(topologies.get_topology_desc(platform="tpu", topology_name=topology).devices)
    tensor = min(tensor, devs.size)
    return Mesh(devs.reshape(devs.size // tensor, tensor), ("data", "tensor"))


def compile_for_topology(mesh: Mesh, fn, arg_specs, out_spec, *, shard_map=True) -> dict:
    """Compile fn(*args) for the mesh; arg_specs: [(shape, dtype, PartitionSpec)].

    With shard_map=True fn sees per-shard arrays (required for Mosaic kernels, which
    cannot be auto-partitioned); otherwise fn is jitted over global arrays (GSPMD).
    Returns {'ok', 'memory': {...}, 'cost': {...}} or {'ok': False, 'error': ...}.
    """
    if shard_map:
        fn = jax.shard_map(
            fn, mesh=mesh, in_specs=tuple(s for _, _, s in arg_specs), out_specs=out_spec, check_vma=False
        )
    args = [jax.ShapeDtypeStruct(shape, dtype, sharding=NamedSharding(mesh, spec)) for shape, dtype, spec in arg_specs]
    try:
        compiled = jax.jit(fn, out_shardings=NamedSharding(mesh, out_spec)).lower(*args).compile()
    except Exception as e:  # report, keep going with the other configs
        return {"ok": False, "error": f"{type(e).__name__}: {str(e).splitlines()[0][:500]}"}
    mem = compiled.memory_analysis()
    memory = {
        k: int(getattr(mem, f"{k}_size_in_bytes"))
        for k in ("argument", "output", "temp", "generated_code", "alias")
        if hasattr(mem, f"{k}_size_in_bytes")
    }
    ca = compiled.cost_analysis()
    ca = ca[0] if isinstance(ca, (list, tuple)) else (ca or {})
    cost = {k: float(ca[k]) for k in COST_KEYS if k in ca}
    return {"ok": True, "memory": memory, "cost": cost}


def configs(small: bool):
    """(name, fn, arg_specs, out_spec) per kernel config. Shapes are global (pre-shard)."""
    Hq, Hk, D, page, dt = (8, 4, 128, 16, jnp.bfloat16) if small else (32, 8, 128, 16, jnp.bfloat16)
    ctx, n_dec, chunk, n_pre = (128, 8, 32, 2) if small else (2048, 64, 512, 8)
    pps = ctx // page
    i32 = jnp.int32
    qs, kvs, rep = P(None, "tensor", None), P(None, None, "tensor", None), P()
    sm = D**-0.5

    def rpa_specs(T, S, kv_dtype=dt):  # int8: each page has its scale rows (pallas_kernels/.../quantized.py)
        return [
            ((T, Hq, D), dt, qs),
            ((S * pps + 1, page_rows(page, D, kv_dtype), 2 * Hk, D), kv_dtype, kvs),
            ((S,), i32, rep),
            ((S, pps), i32, rep),
            ((S + 1,), i32, rep),
            ((1,), i32, rep),
        ]

    rpa = functools.partial(ragged_paged_attention, sm_scale=sm)

    def rpa_sequence_shards(q, kv, kv_lens, table, cu, num_seqs):  # 'data' plays the sequence axis
        index = jax.lax.axis_index("data")[None].astype(i32)
        parts = rpa(q, kv, kv_lens, table, cu, num_seqs, sequence_shards=2, sequence_index=index, return_lse=True)
        return merge_over_axis(*parts, "data").astype(q.dtype)

    seq_specs = rpa_specs(n_dec, n_dec)
    seq_specs[1] = ((n_dec * pps + 2,) + seq_specs[1][0][1:], dt, P("data", None, "tensor", None))  # pages / shard
    seq_specs[3] = ((n_dec, pps // 2), i32, rep)  # each shard's local page table: every other page
    ref = functools.partial(ragged_paged_attention_reference, sm_scale=sm)
    fa_spec = P(None, None, "tensor", None)
    fa = [
        ((1, chunk, Hq, D), dt, fa_spec),
        ((1, ctx, Hk, D), dt, fa_spec),
        ((1, ctx, Hk, D), dt, fa_spec),
        ((1,), i32, P()),
    ]
    return [
        ("rpa_decode", rpa, rpa_specs(n_dec, n_dec), qs),
        ("rpa_decode_int8_kv", rpa, rpa_specs(n_dec, n_dec, jnp.int8), qs),
        ("rpa_decode_reference", ref, rpa_specs(n_dec, n_dec), qs),
        ("rpa_prefill_chunk", rpa, rpa_specs(chunk, n_pre), qs),
        ("rpa_decode_seq2_lse", rpa_sequence_shards, seq_specs, qs),
        ("flash_prefill_chunk", lambda q, k, v, o: flash_attention(q, k, v, sm_scale=sm, q_offset=o), fa, fa_spec),
    ]


def _fmt(r):
    if not r["ok"]:
        return "FAILED " + r["error"]
    m, c = r["memory"], r["cost"]
    mem = " ".join(f"{k}={v / 2**20:.2f}MiB" for k, v in m.items())
    cst = " ".join(f"{k.replace(' ', '_')}={v:.4g}" for k, v in c.items())
    return f"OK  {mem} | {cst}"


def decode_step(topology: str, small: bool) -> dict:
    """Compiles the engine's whole decode step (every layer, cache write, sampling) for `topology` with
    the Pallas kernel, with it over an int8 KV cache (`--kv-dtype int8`) and with the XLA attention path;
    returns memory and cost estimates of each.

    Llama-3-8B in bf16 with 64 slots at 2k context (the tiny preset with 8 slots at 128 with `small`),
    on the topology's preset mesh, compiled through `jaxinfer.compilation` exactly as the engine runs it.
    """
    import jax
    import numpy as np

    from jaxinfer import platform as platforms
    from jaxinfer.compilation import steps as aot_compile
    from jaxinfer.compilation import target
    from jaxinfer.config import get_preset
    from jaxinfer.engine.config import EngineConfig
    from jaxinfer.engine.pages import pages_needed
    from jaxinfer.model.layout import plan_layout
    from jaxinfer.sharding import MESH_AXES

    tgt, spec = target.resolve(topology, None, None)
    mesh = jax.sharding.Mesh(np.asarray(tgt.devices, dtype=object).reshape(spec.shape), MESH_AXES)
    config = get_preset("tiny" if small else "llama3-8b")
    slots, context = (8, 128) if small else (64, 2048)
    layout = plan_layout(config, spec.tensor, quiet=True)
    out = {}
    for kind in ("pallas", "pallas_int8_kv", "xla"):
        attention, kv_dtype = ("pallas", "int8") if kind == "pallas_int8_kv" else (kind, "auto")
        engine = EngineConfig(
            max_slots=slots,
            max_context=context,
            prefill_chunk=slots // spec.data,
            attention=attention,
            kv_dtype=kv_dtype,
        )
        pages = slots // spec.data * pages_needed(context, engine.page_size)
        policy = platforms.resolve("tpu", attention=attention)
        specs = aot_compile.step_specs(config, layout, mesh, jax.numpy.bfloat16, engine, pages, policy)
        try:
            (r,) = aot_compile.compile_buckets(specs, buckets=[slots // spec.data])
            out[kind] = {
                "ok": True,
                "compile_s": r.seconds,
                "memory": r.memory,
                "estimated_seconds": r.estimated_seconds,
                "mosaic_kernel_in_step": "tpu_custom_call" in r.compiled.as_text(),
            }
        except Exception as e:  # report, keep going with the other topologies
            out[kind] = {"ok": False, "error": f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"}
    return out


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--small", action="store_true", help="tiny shapes, one topology (tests)")
    ap.add_argument("--json", metavar="OUT", help="write results as JSON")
    ap.add_argument("--topologies", nargs="+", default=None)
    ap.add_argument("--tensor", type=int, default=4, help="size of the 'tensor' mesh axis")
    a = ap.parse_args(argv)
    topos = a.topologies or (["v5e:2x2"] if a.small else list(TOPOLOGIES))
    results = {}
    for topo in topos:
        mesh = make_mesh(topo, a.tensor)
        print(f"== {topo}  mesh {dict(mesh.shape)}  ({mesh.devices.flat[0].device_kind})")
        results[topo] = {}
        for name, fn, specs, out in configs(a.small):
            r = compile_for_topology(mesh, fn, specs, out)
            results[topo][name] = r
            print(f"  {name:22s} {_fmt(r)}")
        # no kernel-vs-reference comparison: the kernel's figures are its own CostEstimate, not a speed
        step = decode_step(topo, a.small)
        results[topo]["decode_step"] = step
        for kind, r in step.items():
            if r["ok"]:
                est = r["estimated_seconds"]
                print(
                    f"  whole decode step, {kind:14s} compiled OK in {r['compile_s']:.1f}s  temp "
                    f"{r['memory']['temp'] / 2**20:.1f} MiB  args {r['memory']['argument'] / 2**30:.2f} GiB  "
                    f"cost-model estimate {est * 1e3:.3f} ms (not a measured speed; Pallas calls count "
                    "their own CostEstimate)"
                    if est
                    else "  cost-model estimate n/a"
                )
            else:
                print(f"  whole decode step, {kind:14s} FAILED: {r['error']}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(results, f, indent=1)
    return results


if __name__ == "__main__":
    res = main()
    sys.exit(
        0
        if all(r["ok"] for t in res.values() for name, r in t.items() if name != "decode_step")
        and all(r["ok"] for t in res.values() for r in t["decode_step"].values())
        else 1
    )
