"""Best against best: jaxinfer, transformers and CTranslate2, each at each of its dtypes, side by side.

    python scripts/compare_peers.py [--batch 1 8 32] [--prompt-tokens 32] [--new-tokens 32] [--repeats 3]
                                    [--model DIR] [--systems ...] [--json out.json]

Systems (`--systems`, default all): jaxinfer float32, bfloat16, int8, int4 (weights quantized at load,
`jaxinfer.quant`; activations in `--quant-dtype`) and gguf (a GGUF file's own blocks, as stored: Q4_1 for the
embedded SmolLM2); transformers float32 and bfloat16; CTranslate2 int8 when `import ctranslate2` works (the
transformers model converted by CTranslate2's converter). A system this build or this model cannot run
is skipped with a printed note and listed under `unavailable` with the reason.

SmolLM2-135M-Instruct (the embedded GGUF), or `--model`: a GGUF file, or a Hugging Face Llama directory (its
prompts are seeded random token ids). Greedy, equal-length token prompts, EOS ignored. For each batch size every
system runs `--repeats` times (after one uncounted round), alternating: each round runs every system
once, the order rotating by one system per round. Reported per batch: each system's median output
tokens/s and its runs, how many of its requests produced the same tokens as the reference system
(transformers float32, else jaxinfer float32), XLA compilations during its runs after warm-up (jaxinfer);
each family's best system, and the ratio of each family's best to every other family's best.
"""

from __future__ import annotations

import argparse
import copy
import itertools
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import peer_systems  # noqa: E402

SYSTEMS = (
    "jaxinfer float32",
    "jaxinfer bfloat16",
    "jaxinfer int8",
    "jaxinfer int4",
    "jaxinfer gguf",
    "transformers float32",
    "transformers bfloat16",
    "ctranslate2 int8",
)


class Unavailable(Exception):
    """This build, this machine or this model cannot run the system; the message says why."""


def jaxinfer_system(name, args, mesh, max_batch):
    """(generate(prompts, tag), description) of a jaxinfer system, its engine warmed up."""
    from jaxinfer.checkpoint.load import load_model
    from jaxinfer.eval.perplexity import supports_load_option

    variant = name.split()[1]
    kwargs, dtype = {}, args.quant_dtype
    if variant in ("float32", "bfloat16"):
        dtype = variant
    elif not supports_load_option("quant"):
        raise Unavailable("load_model takes no quant= in this build")
    else:
        from jaxinfer.quant.spec import QuantSpec, quant_spec

        if variant == "gguf":
            if args.model is not None and not args.model.endswith(".gguf"):
                raise Unavailable(f"--model {args.model} is not a GGUF file")
            kwargs["quant"] = QuantSpec("gguf")
        else:
            kwargs["quant"] = quant_spec(variant, args.quantize_group)
    model = load_model(args.model, mesh, dtype, **kwargs)
    engine = peer_systems.jaxinfer_engine(model, max_batch, args.prompt_tokens, args.new_tokens, args.attention)
    quant = model.quant.describe()
    return (
        lambda prompts, tag: peer_systems.jaxinfer_generate(engine, prompts, args.new_tokens, tag),
        f"{dtype} activations, weights {quant}, attention {engine.platform.attention}",
    )


def other_system(name, args, hf):
    """(generate(prompts, tag), description) of a transformers or CTranslate2 system."""
    import torch

    if name.startswith("transformers"):
        model = hf if name.endswith("float32") else copy.deepcopy(hf).to(torch.bfloat16)
        return (lambda p, tag: peer_systems.hf_generate(model, p, args.new_tokens), f"torch {torch.__version__}")
    generator = peer_systems.ctranslate2_generator(hf, "int8")
    if generator is None:
        raise Unavailable("ctranslate2 is not installed (pip install ctranslate2)")
    import ctranslate2

    return (
        lambda p, tag: peer_systems.ctranslate2_generate(generator, p, args.new_tokens),
        f"ctranslate2 {ctranslate2.__version__}, int8 weights",
    )


def build_systems(args, mesh, hf):
    """{name: (generate, description)} for the requested systems; {name: reason} for those that cannot run."""
    systems, unavailable = {}, {}
    for name in args.systems:
        try:
            if name.startswith("jaxinfer"):
                systems[name] = jaxinfer_system(name, args, mesh, max(args.batch))
            else:
                systems[name] = other_system(name, args, hf)
        except Unavailable as e:
            unavailable[name] = str(e)
        except Exception as e:  # a system that fails to build is reported, and the others still run
            unavailable[name] = f"failed: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        if name in unavailable:
            print(f"skipping {name}: {unavailable[name]}", flush=True)
    return systems, unavailable


def measure_batch(systems, batch, source, args):
    """One batch size: every system `args.repeats` times, alternating; the row of the report."""
    from jaxinfer.engine import compile_counter

    prompts = peer_systems.batch_prompts(source, batch, args.prompt_tokens)
    names = list(systems)
    rates = {n: [] for n in names}
    compiles = dict.fromkeys(names, 0)
    outputs = {}
    for rep in range(args.repeats + 1):  # the first round warms every system up and is not counted
        shift = rep % len(names)
        for name in names[shift:] + names[:shift]:
            before = compile_counter.count()
            start = time.perf_counter()
            outputs[name] = systems[name][0](prompts, f"{batch}-{rep}")
            elapsed = time.perf_counter() - start
            compiles[name] += compile_counter.count() - before
            if rep:
                rates[name].append(batch * args.new_tokens / elapsed)
    reference = next((n for n in ("transformers float32", "jaxinfer float32") if n in outputs), names[0])
    row = {"batch": batch, "reference": reference, "systems": {}}
    for name in names:
        row["systems"][name] = {
            "tokens_per_s": statistics.median(rates[name]),
            "runs": rates[name],
            "identical_to_reference": sum(a == b for a, b in zip(outputs[name], outputs[reference])),
        }
        if name.startswith("jaxinfer"):
            row["systems"][name]["recompiles_after_warmup"] = compiles[name]
    best = {}
    for name, r in row["systems"].items():
        family = name.split()[0]
        if family not in best or r["tokens_per_s"] > best[family]["tokens_per_s"]:
            best[family] = {"system": name, "tokens_per_s": r["tokens_per_s"]}
    row["best"] = best
    row["best_ratios"] = {
        f"{a}/{b}": best[a]["tokens_per_s"] / best[b]["tokens_per_s"] for a, b in itertools.permutations(best, 2)
    }
    return row


def print_row(row) -> None:
    print(f"batch {row['batch']} (same tokens as {row['reference']}):", flush=True)
    for name, r in sorted(row["systems"].items(), key=lambda kv: -kv[1]["tokens_per_s"]):
        extra = f"  recompiles {r['recompiles_after_warmup']}" if "recompiles_after_warmup" in r else ""
        same = f"{r['identical_to_reference']}/{row['batch']}"
        print(f"  {name:24s} {r['tokens_per_s']:9.1f} tok/s  identical {same}{extra}")
    ratios = ", ".join(f"{k} {v:.2f}x" for k, v in row["best_ratios"].items())
    print(f"  best: {', '.join(b['system'] for b in row['best'].values())}; {ratios}", flush=True)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    peer_systems.add_benchmark_args(p)
    p.add_argument("--systems", nargs="+", default=list(SYSTEMS), choices=SYSTEMS, metavar="SYSTEM")
    p.add_argument("--quant-dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument(
        "--quantize-group",
        type=int,
        default=None,
        help="weights per scale of jaxinfer int8 and int4 (default as --quantize-group: int8 per channel, int4 128)",
    )
    args = p.parse_args(argv)

    from jaxinfer.sharding import ensure_host_devices, parse_mesh

    ensure_host_devices(parse_mesh(args.mesh).size)
    import jax
    import torch
    import transformers

    from jaxinfer.engine import compile_counter
    from jaxinfer.perf import write_report
    from jaxinfer.sharding import make_mesh

    compile_counter.install()
    hf, tok = peer_systems.reference_model(args.model)
    systems, unavailable = build_systems(args, make_mesh(args.mesh), hf)
    source = peer_systems.prompt_source(tok, hf.config.vocab_size, max(args.batch) + args.prompt_tokens)
    rows = []
    for batch in args.batch:
        rows.append(measure_batch(systems, batch, source, args))
        print_row(rows[-1])
    result = dict(
        device=jax.devices()[0].device_kind,
        cpu_count=os.cpu_count(),
        jax=jax.__version__,
        torch=torch.__version__,
        transformers=transformers.__version__,
        prompt_tokens=args.prompt_tokens,
        new_tokens=args.new_tokens,
        repeats=args.repeats,
        descriptions={name: s[1] for name, s in systems.items()},
        unavailable=unavailable,
        results=rows,
    )
    try:
        import ctranslate2

        result["ctranslate2"] = ctranslate2.__version__
    except ImportError:
        pass
    return write_report(result, args.json)


if __name__ == "__main__":
    main()
