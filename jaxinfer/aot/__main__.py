"""`python -m jaxinfer.aot`: compile every engine step for a TPU topology (or this machine) and plan memory
per device and per host (the devices one process drives: v5e:4x4 is 4 hosts of 4 chips).

    python -m jaxinfer.aot --model llama3-8b --topology v5e:2x4 --mesh 2x4 --max-slots 64 \\
        --max-context 4096 --dtype bfloat16 [--kv-pages N | --kv-memory-fraction F] [--out DIR]
    python -m jaxinfer.aot --check DIR     # do DIR's artifacts match this system?

Nothing is loaded or allocated: parameters and the KV cache are abstract sharded shapes. Engine flags
are the same as `run`/`serve`, so the buckets compiled are the ones the server will use. Exit status:
0 fits, 1 does not fit (the message says by how much and what would), 2 bad flags or mismatched DIR.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

log = logging.getLogger("jaxinfer.aot")


def build_parser() -> argparse.ArgumentParser:
    from jaxinfer.bootstrap import add_model_args

    p = argparse.ArgumentParser(
        prog="jaxinfer.aot", description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_model_args(p)
    for action in p._actions:
        if action.dest == "dtype":
            action.choices = None  # also bf16 / f32 (parse_dtype), as deployment notes often write them
    p.add_argument(
        "--topology",
        help="v5e:2x2, v5e:2x4, v5e:4x4, v5p:2x2x1, v6e:2x4, ... or cpu / gpu / tpu "
        "(this machine's devices); default: the --mesh preset's topology",
    )
    p.add_argument(
        "--device-memory-gib",
        type=float,
        default=None,
        help="memory per device (default: the chip's HBM from mesh_configs, or the device's own)",
    )
    p.add_argument(
        "--buckets",
        type=int,
        nargs="+",
        default=None,
        help="compile only these token buckets (default: every bucket the engine uses)",
    )
    p.add_argument(
        "--plan-only",
        action="store_true",
        help="plan memory without compiling (seconds; the plan then lacks the compiler's temporaries)",
    )
    p.add_argument("--out", help="write serialized executables, compile-cache entries and manifest.json here")
    p.add_argument("--check", metavar="DIR", help="only check DIR's manifest against this system")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from jaxinfer.cli_common import setup_logging, user_errors

    setup_logging(args.verbose)
    with user_errors("jaxinfer.aot"):
        from jaxinfer.config import ConfigError

        if args.check:
            from jaxinfer.compilation import manifest

            executables = manifest.load_executables(args.check)
            print(f"{args.check}: matches this system; {len(executables)} executables loaded")
            return 0
        if args.topology not in ("gpu", "tpu"):
            os.environ.setdefault("JAX_PLATFORMS", "cpu")  # TPU topologies compile from the CPU backend
            os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # no chip is claimed: let runs overlap
        from jaxinfer.bootstrap import cluster_scope, join_cluster
        from jaxinfer.multihost.flags import multihost_spec

        if multihost_spec(args) is not None and args.topology not in ("cpu", "gpu", "tpu"):
            raise ConfigError(
                f"--coordinator: --topology {args.topology} is described, not attached, and compiles in one "
                f"process; --coordinator is for compiling on a slice's own devices (--topology tpu on every host)"
            )
        cluster = join_cluster(args)  # every process compiles the same steps for the global devices
        with cluster_scope(cluster, "jaxinfer.aot"):
            return run(args)


def run(args) -> int:
    import jax
    import numpy as np

    from jaxinfer import platform as platforms
    from jaxinfer.bootstrap import engine_config
    from jaxinfer.checkpoint.load import parse_dtype
    from jaxinfer.cli_common import check_paths
    from jaxinfer.compilation import hosts, manifest, plan, target
    from jaxinfer.compilation import steps as aot_compile
    from jaxinfer.compilation.cache import persistent_cache_bypassed
    from jaxinfer.compilation.step_store import StepStore
    from jaxinfer.config import ConfigError
    from jaxinfer.model.layout import plan_layout
    from jaxinfer.model.params import abstract_params
    from jaxinfer.quant.spec import check_fits
    from jaxinfer.sharding import MESH_AXES, per_device_bytes

    check_paths(args, folders=("--out",))
    tgt, spec = target.resolve(args.topology, args.mesh, args.device_memory_gib)
    if args.out:
        from jaxinfer.compilation.cache import use_compile_cache

        use_compile_cache(args.out)
    dtype = parse_dtype(args.dtype)
    config, source = model_config(args.model)
    engine = engine_config(args, config.max_position_embeddings)
    engine.validate(spec.data, config.max_position_embeddings)
    policy = platforms.resolve(tgt.platform, engine.attention, engine.layer_loop, engine.min_bucket)
    mesh = jax.sharding.Mesh(np.asarray(tgt.devices, dtype=object).reshape(spec.shape), MESH_AXES)
    layout = plan_layout(config, spec.tensor)
    quant = model_quant(args, tgt.platform)
    check_fits(quant, config, layout.mlp, spec.tensor)
    draft = model_config(args.draft_model)[0] if args.speculative == "draft" else None
    specs = aot_compile.step_specs(config, layout, mesh, dtype, engine, 1, policy, draft, quant)
    weights = per_device_bytes(specs.params)
    pages = plan.resolve_pages(
        engine, specs.cache_shape, tgt.memory_bytes, weights, spec.tensor, spec.data, spec.sequence
    )
    specs = aot_compile.step_specs(config, layout, mesh, dtype, engine, pages, policy, draft, quant)
    kv = per_device_bytes(specs.caches)
    buckets = args.buckets or specs.buckets
    unknown = sorted(set(buckets) - set(specs.buckets))
    if unknown:
        raise ConfigError(f"--buckets {unknown}: the engine's buckets are {list(specs.buckets)}")
    n_hosts, devices_per_host = hosts.host_shape(tgt.devices)
    print(
        f"{config.name} ({source}, {dtype.name}, {config.param_count() / 1e9:.2f}B params) on {tgt.name} "
        f"({len(tgt.devices)} x {tgt.device_kind}, {tgt.memory_bytes / plan.GiB:.1f} GiB each; "
        f"{n_hosts} hosts x {devices_per_host} devices), mesh {spec}"
    )
    if quant.enabled:
        print(f"weights quantized: {quant.describe()}")
    print(
        f"engine: {engine.max_slots} slots, context {engine.max_context}, page {engine.page_size}, "
        f"{pages} KV pages per device, attention {policy.attention}, buckets {list(specs.buckets)}"
    )
    print(plan.kv_line(specs.cache_shape, spec.tensor))

    results, oom = [], None
    if weights + kv <= tgt.memory_bytes and not args.plan_only:  # else compiling (minutes) changes nothing
        try:
            with persistent_cache_bypassed():  # what StepStore serializes must be a real compile
                for r in aot_compile.compile_buckets(specs, buckets):
                    log.info("step %s compiled in %.1fs", r.bucket, r.seconds)
                    results.append(r)
        except Exception as e:  # XLA refuses programs that exceed the chip's memory
            if "RESOURCE_EXHAUSTED" not in str(e) and "out of memory" not in str(e).lower():
                raise
            oom = str(e).splitlines()[0][:300]
        print(f"\nper executable (per device):\n{plan.bucket_table(results)}")
    p = plan.build(
        tgt.memory_bytes,
        weights,
        kv,
        specs.cache_shape,
        pages,
        spec.tensor,
        spec.data,
        engine.max_context,
        results,
        spec.sequence,
    )
    print(f"\nmemory plan per device:\n{plan.plan_table(p)}")
    print(
        f"largest KV cache that fits: {p.max_kv_pages} pages per device = {p.max_slots} concurrent "
        f"requests of {engine.max_context} tokens"
    )
    spread = f", its pages over {spec.sequence} sequence shards" if spec.sequence > 1 else ""
    print(
        f"longest context one request can hold: {p.longest_context:,} tokens{spread} "
        f"(the model's limit: {config.max_position_embeddings:,})"
    )
    per_host = hosts.build(p, tgt.devices, abstract_params(config, layout, dtype, mesh, quant))
    print(f"\nmemory plan per host:\n{plan.plan_table(per_host, f'per host ({per_host.devices_per_host} devices)')}")
    print(hosts.load_line(per_host))
    if args.out and results:
        with persistent_cache_bypassed():
            extra = aot_compile.compile_penalty_rows(specs)
        files = StepStore(args.out).save(specs, {**{r.bucket: r.compiled for r in results}, **extra})
        path = manifest.write(
            args.out,
            {
                "model": {
                    "name": config.name,
                    "source": source,
                    "dtype": dtype.name,
                    "params": config.param_count(),
                    "quant": quant.to_json(),
                },
                "mesh": dict(zip(MESH_AXES, spec.shape)),
                "engine": {
                    **vars(engine),
                    "kv_pages": pages,
                    "attention": policy.attention,
                    "layer_loop": policy.layer_loop,
                },
                "buckets": list(buckets),
                "target": {
                    "name": tgt.name,
                    "platform": tgt.platform,
                    "device_kind": tgt.device_kind,
                    "num_devices": len(tgt.devices),
                    "device_ids": [d.id for d in tgt.devices],
                    "memory_bytes": tgt.memory_bytes,
                    "hosts": per_host.hosts,
                    "devices_per_host": per_host.devices_per_host,
                },
                "plan": {**vars(p), "total": p.total, "fits": p.fits, "per_host": per_host.record()},
                "steps": [
                    {
                        "bucket": r.bucket,
                        "compile_seconds": r.seconds,
                        "memory": r.memory,
                        "estimated_seconds": r.estimated_seconds,
                    }
                    for r in results
                ],
            },
            files,
        )
        print(f"wrote {path}")
    if p.fits and oom is None:
        print(f"FITS: {plan.format_bytes(p.total)} of {plan.format_bytes(tgt.memory_bytes)} per device")
        return 0
    if oom is not None:  # the plan above lacks this bucket's temporaries, so its page count is no guide
        print(
            f"DOES NOT FIT: XLA ran out of memory compiling step {specs.keys_of(buckets)[len(results)]} ({oom}); lower "
            f"--kv-pages (now {pages}), --max-slots or --max-context, or use more chips",
            file=sys.stderr,
        )
        return 1
    hint = plan.suggestion(
        p,
        config,
        dtype,
        target.generation(tgt.name),
        spec.data,
        engine.max_slots,
        engine.max_context,
        engine.page_size,
        [
            (s.topology, s.size, s.hbm_bytes_per_device)
            for s in target.presets().values()
            if s.topology and s.hbm_bytes_per_device
        ],
        specs.cache_shape.dtype,
    )
    over = p.total - tgt.memory_bytes
    what = "" if results else " before compiler temporaries"
    print(
        f"DOES NOT FIT: needs {p.total / plan.GiB:.2f} GiB per device{what}, {tgt.name} has "
        f"{tgt.memory_bytes / plan.GiB:.2f} GiB (over by {over / plan.GiB:.2f} GiB); {hint}",
        file=sys.stderr,
    )
    return 1


def model_config(spec: str | None):
    """(ModelConfig, source) of `--model` without reading any weights."""
    from jaxinfer.checkpoint import orbax_store
    from jaxinfer.checkpoint.default_model import DEFAULT_MODEL
    from jaxinfer.checkpoint.load import ensure_default_model
    from jaxinfer.checkpoint.open_source import open_source
    from jaxinfer.config import PRESETS, ModelConfig, get_preset

    if spec in (None, "", DEFAULT_MODEL):
        spec = str(ensure_default_model())
    if spec in PRESETS:
        return get_preset(spec), f"preset:{spec}"
    if orbax_store.is_native_checkpoint(spec):
        return ModelConfig.from_hf_config(os.path.join(spec, "config.json")), spec
    with open_source(spec) as source:
        return source.config, spec


def model_quant(args, platform: str):
    """The weight quantization --quantize asks for (gguf: read from the file's tensor types)."""
    from jaxinfer.checkpoint.open_source import open_source
    from jaxinfer.checkpoint.stored_quant import stored_spec
    from jaxinfer.quant.flags import spec_from_args

    quant = spec_from_args(args)
    if quant.label == "gguf":
        from jaxinfer.checkpoint.default_model import DEFAULT_MODEL, smollm2_gguf_path

        path = smollm2_gguf_path() if args.model in (None, "", DEFAULT_MODEL) else args.model
        with open_source(path) as source:
            quant = stored_spec(source)
    return quant.for_platform(platform)


if __name__ == "__main__":
    sys.exit(main())
