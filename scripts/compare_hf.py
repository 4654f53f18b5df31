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


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batch", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--prompt-tokens", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--model", default=None, help="a Hugging Face Llama directory (default: the embedded SmolLM2)")
    p.add_argument("--mesh", default="1x1")
    p.add_argument(
        "--attention",
        default="auto",
        choices=["auto", "native", "xla"],
        help="jaxinfer's attention path (auto: the native C++ kernel on CPU where it builds)",
    )
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)

    from jaxinfer.sharding import ensure_host_devices, parse_mesh

    ensure_host_devices(parse_mesh(args.mesh).size)
    import jax
    import numpy as np
    import torch
    import transformers

    from jaxinfer.checkpoint.default_model import smollm2_gguf_path
    from jaxinfer.checkpoint.load import load_model
    from jaxinfer.engine.engine import Engine, EngineConfig
    from jaxinfer.engine.requests import Request, SamplingParams
    from jaxinfer.perf import write_report
    from jaxinfer.sharding import make_mesh
    from jaxinfer.tokenizer import load_tokenizer

    torch.set_num_threads(os.cpu_count() or 1)
    model = load_model(args.model, make_mesh(args.mesh), "float32")
    if args.model is None:
        gguf = smollm2_gguf_path()
        tok = load_tokenizer(gguf)
        hf = transformers.AutoModelForCausalLM.from_pretrained(
            os.path.dirname(gguf), gguf_file=os.path.basename(gguf), dtype=torch.float32
        )
        text = (
            "The history of astronomy is long. Ancient peoples watched the sky to keep time and tell stories "
            "about the planets, the moon and the stars. "
        ) * 8
        base = tok.encode(text, add_bos=False)
    else:
        tok = None  # token ids in and out: the engine needs no tokenizer
        hf = transformers.AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
        size = max(args.batch) + args.prompt_tokens
        base = np.random.default_rng(0).integers(0, model.config.vocab_size, size).tolist()
    hf.eval()
    rows = []
    for batch in args.batch:
        prompts = [base[i : i + args.prompt_tokens] for i in range(batch)]
        # the step budget fits the whole batch's prompts, as transformers prefills the batch in one call
        engine = Engine(
            model,
            tok,
            EngineConfig(
                max_slots=max(batch, model.mesh.shape["data"]),
                max_context=args.prompt_tokens + args.new_tokens + 8,
                prefill_chunk=args.prompt_tokens,
                max_step_tokens=max(batch, batch * args.prompt_tokens),
                attention=args.attention,
                prefix_cache=False,  # transformers recomputes every prompt in every repetition; so do we
            ),
        )
        engine.warmup()
        ours_rates, hf_rates = [], []
        for rep in range(args.repeats + 1):  # first round warms both up and is not counted
            reqs = [
                Request(f"{rep}-{i}", p, SamplingParams(max_tokens=args.new_tokens, ignore_eos=True))
                for i, p in enumerate(prompts)
            ]
            start = time.perf_counter()
            ours = [r.token_ids for r in engine.generate(reqs)]
            ours_time = time.perf_counter() - start
            x = torch.tensor(prompts)
            start = time.perf_counter()
            with torch.no_grad():
                out = hf.generate(
                    x,
                    attention_mask=torch.ones_like(x),
                    max_new_tokens=args.new_tokens,
                    min_new_tokens=args.new_tokens,
                    do_sample=False,
                    pad_token_id=0,
                )
            hf_time = time.perf_counter() - start
            theirs = out[:, args.prompt_tokens :].tolist()
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
