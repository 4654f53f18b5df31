"""Sequence parallelism on the CPU mesh: SmolLM2-135M greedy outputs and long-prompt prefill on a mesh with a
`sequence` axis against the same mesh without one, alternating.

    python scripts/benchmark_sequence.py [--meshes 1x1x4 1x2x4] [--prefill 8000] [--repeats 3]
                                         [--lengths 1 40 300 1500 6000] [--new-tokens 8]

1. Equivalence: one engine per mesh greedily continues prompts of `--lengths` tokens (cut from a
   public-domain text, repeated to length); every mesh's tokens must equal the first mesh's. Exit 1 if not.
2. Prefill: the time from submitting one `--prefill`-token prompt to its first token (the whole prompt
   prefilled in chunks of --prefill-chunk tokens, then one sampled token), `--repeats` times per mesh,
   meshes alternating; reported: medians and the ratio to the first mesh.

On one CPU host the "devices" are threads sharing its cores (8 of them on 2 cores here), so a sequence
axis adds work (gathers of the step's queries and K/V, the merge of partial results) and cannot speed a
step up: this measures the overhead, not the speedup a TPU slice gets from splitting the tokens.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

TEXT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests/data/perplexity_text.txt")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="model path (default: the embedded SmolLM2-135M-Instruct)")
    parser.add_argument("--meshes", nargs="+", default=["1x1x4", "1x2x4"])
    parser.add_argument("--lengths", nargs="*", type=int, default=[1, 40, 300, 1500, 6000])
    parser.add_argument("--new-tokens", type=int, default=8)
    parser.add_argument("--prefill", type=int, default=8000, help="prompt tokens of the prefill timing (0: skip)")
    parser.add_argument("--prefill-chunk", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)

    from jaxinfer.sharding import ensure_host_devices, parse_mesh

    ensure_host_devices(max(parse_mesh(m).size for m in args.meshes))
    import jax

    from jaxinfer.checkpoint.default_model import smollm2_gguf_path
    from jaxinfer.checkpoint.load import load_model
    from jaxinfer.engine.engine import Engine, EngineConfig
    from jaxinfer.engine.requests import Request, SamplingParams
    from jaxinfer.sharding import make_mesh
    from jaxinfer.tokenizer import load_tokenizer

    path = args.model or smollm2_gguf_path()
    tok = load_tokenizer(path)
    ids = tok.encode(open(TEXT, encoding="utf-8").read(), add_bos=False)
    longest = max(args.lengths + [args.prefill])
    ids = (ids * (longest // len(ids) + 1))[:longest]
    context = min(8192, -(-(longest + args.new_tokens) // 512) * 512)
    engines = {}
    for mesh in args.meshes:
        model = load_model(path, make_mesh(mesh), "float32")
        config = EngineConfig(  # no prefix cache: the timed prompt repeats, and every run must compute it
            max_slots=4, max_context=context, prefill_chunk=args.prefill_chunk, min_bucket=64, prefix_cache=False
        )
        engines[mesh] = Engine(model, tok, config)
        started = time.perf_counter()
        engines[mesh].warmup()
        print(f"{mesh}: warm-up {time.perf_counter() - started:.1f} s, buckets {engines[mesh].buckets}", flush=True)

    for engine in engines.values():  # the compile counter is the process's: count from here for all engines
        engine.mark_warm()
    failed = 0
    if args.lengths:
        outputs = {}
        for mesh, engine in engines.items():
            requests = [
                Request(f"p{n}", ids[:n], SamplingParams(max_tokens=args.new_tokens, ignore_eos=True))
                for n in args.lengths
            ]
            outputs[mesh] = [r.token_ids for r in engine.generate(requests)]
        first = args.meshes[0]
        for mesh in args.meshes[1:]:
            for n, a, b in zip(args.lengths, outputs[first], outputs[mesh]):
                same = a == b
                failed += not same
                print(f"greedy, prompt of {n:>5} tokens: {mesh} {'equals' if same else 'DIFFERS FROM'} {first}")

    if args.prefill:
        times = {mesh: [] for mesh in args.meshes}
        for r in range(args.repeats):
            for mesh, engine in engines.items():
                request = Request(f"prefill{r}", ids[: args.prefill], SamplingParams(max_tokens=1, ignore_eos=True))
                started = time.perf_counter()
                engine.generate([request])
                times[mesh].append(time.perf_counter() - started)
        base = statistics.median(times[args.meshes[0]])
        print(f"\nprefill of {args.prefill} tokens (chunks of {args.prefill_chunk}), median of {args.repeats}:")
        for mesh in args.meshes:
            med = statistics.median(times[mesh])
            runs = ", ".join(f"{t:.1f}" for t in times[mesh])
            print(f"  {mesh}: {med:.1f} s ({runs}); {med / base:.2f}x the time of {args.meshes[0]}")
        print(f"jax {jax.__version__}, {os.cpu_count()} CPUs, {jax.device_count()} host devices")
        for engine in engines.values():
            if engine.compilations_after_warmup:
                print(f"recompiles after warm-up: {engine.compilations_after_warmup}")
                failed += 1
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
