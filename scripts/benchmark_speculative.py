"""Speculative decoding against none, on the embedded SmolLM2-135M-Instruct (float32, greedy), side by side.

    python scripts/benchmark_speculative.py [--draft-model DIR] [--repeats 3] [--new-tokens 96] [--mesh 1x1]

Workloads:
  grounded   batch 1, prompts that copy most of a given passage or code (rewrite, fix the spelling,
             rename a variable): --speculative ngram against none;
  chat       batch 1, chat questions: --speculative draft (--draft-model, e.g. the distilled draft of
             `python -m jaxinfer.distill`) against none;
  batch32    32 chat questions at once, adaptive speculation on (ngram, and draft when given) against none.
Each workload runs its systems alternately `--repeats` times in one process (one engine per system,
compiled once; the step executables come from JAX's persistent cache after the first start); a batch-1
workload runs its prompts one at a time. Reported: median output tokens/s per system, the ratio of the
medians, each repeat's paired ratio, acceptance rates, and whether the tokens equal those without
speculation (they must).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

PASSAGE = (
    "The old lighthouse stood at the edge of the cliff for more than a hundred years. Every night its keeper "
    "climbed the narrow stairs, lit the great lamp and watched the ships pass safely through the dark water. "
    "When the storms came, the light never failed, and the people of the village said that as long as it "
    "burned, no sailor would be lost on their rocks."
)
CODE = (
    "def total_price(items):\n    result = 0\n    for item in items:\n        result = result + item.price * "
    "item.count\n    return result\n\n\ndef cheapest(items):\n    best = None\n    for item in items:\n        "
    "if best is None or item.price < best.price:\n            best = item\n    return best\n"
)
GROUNDED = [
    f"Rewrite the following passage exactly, but in the past perfect tense where possible:\n\n{PASSAGE}",
    f"Copy this text and fix any spelling mistakes:\n\n{PASSAGE.replace('lighthouse', 'lighthous')}",
    f"Rename the variable `result` to `total` in this code and show the whole code:\n\n```python\n{CODE}```",
    f"Add a docstring to each function in this code and show the whole code:\n\n```python\n{CODE}```",
]
CHAT = [
    "What is the capital of France?",
    "Give me three tips for staying healthy.",
    "Explain what a computer is to a child.",
    "Write a short poem about the sea.",
    "How do plants make their food?",
    "What are the colors of the rainbow?",
    "Describe a cat in two sentences.",
    "Why is the sky blue?",
]


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--draft-model", default=None, help="a draft with SmolLM2's tokenizer (the chat workload needs it)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--new-tokens", type=int, default=96)
    p.add_argument("--mesh", default="1x1")
    p.add_argument("--num-speculative-tokens", type=int, default=4)
    p.add_argument("--workloads", nargs="+", default=["grounded", "chat", "batch32"])
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)

    from jaxinfer.sharding import ensure_host_devices, parse_mesh

    ensure_host_devices(parse_mesh(args.mesh).size)
    from jaxinfer.checkpoint.load import load_model
    from jaxinfer.compilation.cache import use_compile_cache
    from jaxinfer.engine.engine import Engine, EngineConfig
    from jaxinfer.engine.requests import Request, SamplingParams
    from jaxinfer.paths import default_cache_dir
    from jaxinfer.perf import write_report
    from jaxinfer.sharding import make_mesh
    from jaxinfer.tokenizer import load_tokenizer

    use_compile_cache(str(default_cache_dir() / "benchmark-compile-cache"))
    mesh = make_mesh(args.mesh)
    model = load_model(None, mesh, "float32")
    tok = load_tokenizer(model.tokenizer_path)
    draft = load_model(args.draft_model, mesh, "float32") if args.draft_model else None

    def engine(mode: str, slots: int) -> Engine:
        config = EngineConfig(
            max_slots=slots,
            max_context=1024,
            prefill_chunk=128,
            max_step_tokens=max(128, slots * (args.num_speculative_tokens + 1)),
            speculative=mode,
            num_speculative_tokens=args.num_speculative_tokens,
            strict_no_recompile=True,
        )
        e = Engine(model, tok, config, draft=draft if mode == "draft" else None)
        e.warmup()
        return e

    def requests(texts):
        params = SamplingParams(max_tokens=args.new_tokens)
        return [
            Request(f"q{i}", tok.encode_chat([{"role": "user", "content": t}]), params) for i, t in enumerate(texts)
        ]

    def run(e: Engine, texts, batch: int):
        before = e.status()
        start = time.perf_counter()
        results = []
        reqs = requests(texts)
        for i in range(0, len(reqs), batch):
            results += e.generate(reqs[i : i + batch])
        seconds = time.perf_counter() - start
        after = e.status()
        tokens = sum(r.completion_tokens for r in results)
        proposed = after.spec_proposed - before.spec_proposed
        accepted = after.spec_accepted - before.spec_accepted
        assert after.compilations_after_warmup == 0
        return tokens / seconds, [r.token_ids for r in results], accepted / proposed if proposed else None

    workloads = {
        "grounded": (GROUNDED, 1, ["none", "ngram"]),
        "chat": (CHAT, 1, ["none", "draft"] if draft else []),
        "batch32": ((CHAT * 4)[:32], 32, ["none", "ngram"] + (["draft"] if draft else [])),
    }
    report = {}
    for name in args.workloads:
        texts, batch, modes = workloads[name]
        if not modes:
            print(f"{name}: skipped (needs --draft-model)")
            continue
        engines = {m: engine(m, batch) for m in modes}
        for e in engines.values():  # the process-wide compile count moved while the others compiled
            e.mark_warm()
        rates = {m: [] for m in modes}
        accept = {m: [] for m in modes}
        same = True
        for _ in range(args.repeats):
            tokens = {}
            for m in modes:
                rate, tokens[m], acc = run(engines[m], texts, batch)
                rates[m].append(rate)
                if acc is not None:
                    accept[m].append(acc)
            same &= all(tokens[m] == tokens["none"] for m in modes)
        base = statistics.median(rates["none"])
        row = {"batch": batch, "identical_tokens": same}
        for m in modes:
            paired = [r / n for r, n in zip(rates[m], rates["none"])]
            row[m] = {
                "tok_s": statistics.median(rates[m]),
                "ratio": statistics.median(rates[m]) / base,
                "paired": paired,
                "acceptance": statistics.median(accept[m]) if accept[m] else None,
            }
            print(
                f"{name} batch {batch} {m:6s} {row[m]['tok_s']:8.1f} tok/s  x{row[m]['ratio']:.2f} "
                f"(paired {', '.join(f'{x:.2f}' for x in paired)})"
                + (f"  acceptance {row[m]['acceptance']:.2f}" if row[m]["acceptance"] is not None else "")
            )
        print(f"{name}: tokens identical to none: {same}")
        report[name] = row
        del engines
    if args.json:
        write_report(report, args.json)
    return report


if __name__ == "__main__":
    main()
