"""jaxinfer vs Hugging Face transformers `generate` on the same model, prompts and greedy settings.

    python scripts/compare_hf.py [--batch 1 8 32] [--prompt-tokens 32] [--new-tokens 32] [--repeats 3] [--model DIR]

SmolLM2-135M-Instruct (the embedded GGUF) or `--model DIR`, a Hugging Face Llama directory (config.json
+ *.safetensors, read by both sides; its prompts are seeded random token ids), float32 on both sides.
Prompts are of equal token length (no padding, so batched HF output is comparable token for token).
For each batch size the two systems run alternately `--repeats` times in one process; reported:
median output tokens/s of each, the ratio of the medians, each repeat's paired ratio (the two runs
of one repeat are seconds apart, so a noisy machine moves both) with their median, and whether every
generated token matched.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import peer_systems  # noqa: E402


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    peer_systems.add_benchmark_args(p)
    args = p.parse_args(argv)

    from jaxinfer.sharding import ensure_host_devices, parse_mesh

    ensure_host_devices(parse_mesh(args.mesh).size)
    import jax
    import torch
    import transformers

    from jaxinfer.checkpoint.load import load_model
    from jaxinfer.perf import write_report
    from jaxinfer.sharding import make_mesh

    model = load_model(args.model, make_mesh(args.mesh), "float32")
    hf, tok = peer_systems.reference_model(args.model)
    source = peer_systems.prompt_source(tok, model.config.vocab_size, max(args.batch) + args.prompt_tokens)
    rows = []
    for batch in args.batch:
        prompts = peer_systems.batch_prompts(source, batch, args.prompt_tokens)
        engine = peer_systems.jaxinfer_engine(model, batch, args.prompt_tokens, args.new_tokens, args.attention)
        ours_rates, hf_rates = [], []
        for rep in range(args.repeats + 1):  # first round warms both up and is not counted
            start = time.perf_counter()
            ours = peer_systems.jaxinfer_generate(engine, prompts, args.new_tokens, str(rep))
            ours_time = time.perf_counter() - start
            start = time.perf_counter()
            theirs = peer_systems.hf_generate(hf, prompts, args.new_tokens)
            hf_time = time.perf_counter() - start
            if rep:
                ours_rates.append(batch * args.new_tokens / ours_time)
                hf_rates.append(batch * args.new_tokens / hf_time)
        matched = sum(a == b for a, b in zip(ours, theirs))
        row = dict(
            batch=batch,
            attention=engine.platform.attention,
            jaxinfer_tokens_per_s=statistics.median(ours_rates),
            transformers_tokens_per_s=statistics.median(hf_rates),
            identical_outputs=matched == batch,
            identical_requests=matched,
        )
        row["ratio"] = row["jaxinfer_tokens_per_s"] / row["transformers_tokens_per_s"]
        row["paired_ratios"] = [a / b for a, b in zip(ours_rates, hf_rates)]
        row["median_paired_ratio"] = statistics.median(row["paired_ratios"])
        rows.append(row)
        print(
            f"batch {batch:3d}: jaxinfer {row['jaxinfer_tokens_per_s']:8.1f} tok/s  transformers "
            f"{row['transformers_tokens_per_s']:8.1f} tok/s  ratio {row['ratio']:5.2f}x  paired "
            f"{' '.join(f'{r:.2f}' for r in row['paired_ratios'])} (median {row['median_paired_ratio']:.2f}x)  "
            f"identical {matched}/{batch}",
            flush=True,
        )
    result = dict(
        device=jax.devices()[0].device_kind,
        torch=torch.__version__,
        transformers=transformers.__version__,
        jax=jax.__version__,
        prompt_tokens=args.prompt_tokens,
        new_tokens=args.new_tokens,
        results=rows,
    )
    return write_report(result, args.json)


if __name__ == "__main__":
    main()
