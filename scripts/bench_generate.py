"""Generation throughput of the engine at batch sizes 1, 8 and 32 (a benchmark, not a test).

    python scripts/bench_generate.py [--mesh 1x1] [--model ...] [--batch 1 8 32] [--new-tokens 32]

For each batch size: B identical-length requests run together (ignore_eos, fixed output length)
after warm-up; reports output tokens/s, median decode step time, and MBU (weights + KV read per
decode step / step time / peak bandwidth) where the device's bandwidth is known.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

sys.path.insert(0, __import__("os").path.dirname(__import__("os").path.dirname(__file__)))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--mesh", default="1x1")
    p.add_argument("--model", default=None)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--batch", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--prompt-tokens", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--json", default=None)
    args = p.parse_args()

    from jaxinfer.sharding import ensure_host_devices, parse_mesh

    ensure_host_devices(parse_mesh(args.mesh).size)
    import jax

    from jaxinfer.checkpoint.load import load_model
    from jaxinfer.engine.engine import Engine, EngineConfig
    from jaxinfer.engine.requests import Request, SamplingParams
    from jaxinfer.perf import peak_bandwidth, write_report
    from jaxinfer.sharding import make_mesh, per_device_bytes

    mesh = make_mesh(args.mesh)
    model = load_model(args.model, mesh, args.dtype)
    weights = per_device_bytes(model.params)
    bw = peak_bandwidth(mesh.devices.flat[0])
    rows = []
    for batch in args.batch:
        context = args.prompt_tokens + args.new_tokens + 16
        engine = Engine(
            model,
            None,
            EngineConfig(
                max_slots=max(batch, mesh.shape["data"]),
                max_context=context,
                prefill_chunk=max(64, args.prompt_tokens),
                prefix_cache=False,  # repeated runs of the same prompts must compute them every time
            ),
        )
        engine.warmup()
        reqs = [
            Request(
                f"b{i}",
                [(7 * i + j) % 1000 + 10 for j in range(args.prompt_tokens)],
                SamplingParams(max_tokens=args.new_tokens, ignore_eos=True),
            )
            for i in range(batch)
        ]
        for req in reqs:
            engine.submit(req)
        step_times = []
        start = time.perf_counter()
        while engine.has_work():  # each step() dispatches one step and reads back the one before it
            t = time.perf_counter()
            engine.step()
            step_times.append(time.perf_counter() - t)
        elapsed = time.perf_counter() - start
        decode_step = statistics.median(step_times)  # decode steps dominate: prefill is 1-2 steps
        kv_bytes = engine.cache_shape.bytes_per_page * (context // engine.config.page_size) * batch // mesh.size
        achieved = (weights + kv_bytes) / decode_step
        rows.append(
            dict(
                batch=batch,
                output_tokens_per_s=batch * args.new_tokens / elapsed,
                decode_step_ms=decode_step * 1e3,
                achieved_gb_s=achieved / 1e9,
                mbu=(achieved / bw) if bw else None,
                compilations_after_warmup=engine.compilations_after_warmup,
            )
        )
        print(
            f"batch {batch:3d}: {rows[-1]['output_tokens_per_s']:8.1f} tok/s  step {decode_step * 1e3:7.1f} ms  "
            f"{achieved / 1e9:6.2f} GB/s" + (f"  MBU {achieved / bw:.1%}" if bw else "  MBU n/a (bandwidth unknown)"),
            flush=True,
        )
    info = dict(
        device=jax.devices()[0].device_kind,
        mesh=args.mesh,
        model=model.config.name,
        dtype=args.dtype,
        jax=jax.__version__,
        results=rows,
    )
    write_report(info, args.json)


if __name__ == "__main__":
    main()
