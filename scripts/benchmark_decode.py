"""Decode-step roofline: step time, tokens/s, bytes moved, achieved bandwidth, MBU and MFU.

    python scripts/benchmark_decode.py --batch 1 16 64 --context 128 2048 \
        [--model llama3-8b --layers 8 --dtype bfloat16]

For each (batch, context): `batch` requests with `context`-token prompts are prefilled, then
`--steps` decode steps are timed one by one (the host blocks once per step, so a step's wall time
is the device step time) and the median is reported. Bytes per step = parameter bytes per device +
KV bytes read per device. MBU divides achieved bandwidth by the device's peak (published figure) or,
where none is known, by the bandwidth measured here with a large device copy; MFU divides
2 x params x batch / step time by the measured dense matmul FLOP/s. A preset `--model` uses random
weights; `--layers` shortens it to fit a device.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=None, help="preset (random weights), checkpoint, or default embedded model")
    p.add_argument("--layers", type=int, default=None, help="override the preset's layer count")
    p.add_argument("--mesh", default="1x1")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--batch", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--context", type=int, nargs="+", default=[128])
    p.add_argument("--steps", type=int, default=16)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)

    from jaxinfer.sharding import ensure_host_devices, parse_mesh

    ensure_host_devices(parse_mesh(args.mesh).size)
    import jax

    from jaxinfer import perf
    from jaxinfer.checkpoint.load import load_model, parse_dtype
    from jaxinfer.config import PRESETS
    from jaxinfer.engine.engine import Engine, EngineConfig
    from jaxinfer.engine.requests import Request, SamplingParams
    from jaxinfer.model.forward import ShardedModel
    from jaxinfer.model.layout import plan_layout
    from jaxinfer.model.params import init_params
    from jaxinfer.platform import layer_loop_for, mesh_platform
    from jaxinfer.sharding import make_mesh, per_device_bytes

    mesh = make_mesh(args.mesh)
    if args.model in PRESETS and args.layers:
        config = PRESETS[args.model].replace(num_layers=args.layers)
        layout = plan_layout(config, mesh.shape["tensor"])
        dtype = parse_dtype(args.dtype)
        model = ShardedModel(
            config, layout, mesh, init_params(config, layout, mesh, dtype), dtype, f"preset:{args.model}"
        )
        model = model.with_layer_loop(layer_loop_for(mesh_platform(mesh)))  # the platform's, as load_model does
    else:
        model = load_model(args.model, mesh, args.dtype)
    device = mesh.devices.flat[0]
    measured_bw = perf.measure_bandwidth(device)
    peak_bw = perf.peak_bandwidth(device)
    flops = perf.measure_matmul_flops(device, dtype=args.dtype)
    weights = per_device_bytes(model.params)
    n_params = sum(math.prod(x.shape) for x in jax.tree.leaves(model.params))
    rows = []
    for context in args.context:
        for batch in args.batch:
            slots = max(batch, mesh.shape["data"])
            engine = Engine(
                model,
                None,
                EngineConfig(
                    max_slots=slots,
                    max_context=context + args.steps + 8,
                    prefill_chunk=min(context, 512),
                    prefix_cache=False,  # a decode benchmark: each request prefills its own context
                ),
            )
            engine.warmup()
            for i in range(batch):
                engine.submit(
                    Request(
                        f"r{i}",
                        [(i * 31 + j) % 1000 + 3 for j in range(context)],
                        SamplingParams(max_tokens=args.steps + 2, ignore_eos=True),
                    )
                )
            while engine.status().prefilling:
                engine.step()  # prefill
            times = []
            for _ in range(args.steps):
                start = time.perf_counter()
                engine.step()
                times.append(time.perf_counter() - start)
            while engine.has_work():
                engine.step()
            step = statistics.median(times)
            kv = (
                perf.kv_bytes_read_per_device(
                    engine.cache_shape, batch * (context + args.steps // 2), mesh.shape["tensor"]
                )
                // mesh.shape["data"]
            )
            achieved = (weights + kv) / step
            rows.append(
                dict(
                    batch=batch,
                    context=context,
                    step_ms=step * 1e3,
                    tokens_per_s=batch / step,
                    weight_bytes=weights,
                    kv_bytes=kv,
                    achieved_bytes_per_s=achieved,
                    mbu=achieved / (peak_bw or measured_bw),
                    mfu=2 * n_params * batch / mesh.size / step / flops,
                    compilations_after_warmup=engine.compilations_after_warmup,
                )
            )
            r = rows[-1]
            print(
                f"batch {batch:4d} context {context:6d}: step {r['step_ms']:8.2f} ms  {r['tokens_per_s']:9.1f} tok/s  "
                f"{achieved / 1e9:7.2f} GB/s  MBU {r['mbu']:6.1%}  MFU {r['mfu']:6.2%}",
                flush=True,
            )
    result = dict(
        device=device.device_kind,
        platform=device.platform,
        mesh=args.mesh,
        model=model.config.name,
        dtype=args.dtype,
        params=n_params,
        jax=jax.__version__,
        measured_bandwidth=measured_bw,
        peak_bandwidth=peak_bw,
        bandwidth_basis="peak" if peak_bw else "measured",
        measured_matmul_flops=flops,
        results=rows,
    )
    return perf.write_report(result, args.json)


if __name__ == "__main__":
    main()
