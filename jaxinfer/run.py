"""`python -m jaxinfer.run`: batch generation over prompts or a JSONL file, with a latency/throughput summary.

    python -m jaxinfer.run --mesh 2x4 --prompt "What is the capital of France?"
    python -m jaxinfer.run --input prompts.jsonl --output out.jsonl --temperature 0.7 --seed 1

Each JSONL line is an object with `prompt` (text) or `messages` (chat), optional `id` and optional
sampling parameters (max_tokens, temperature, top_k, top_p, min_p, seed, stop, stop_token_ids,
ignore_eos, logprobs, top_logprobs, prompt_logprobs, presence_penalty, frequency_penalty,
repetition_penalty, logit_bias). A bad line is reported (with its line number) and in the output file; the
others still run; the exit status is then 2.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from jaxinfer.bootstrap import add_model_args, build_engine, cluster_scope, join_cluster
from jaxinfer.cli_common import check_paths, setup_logging, user_errors

BUILTIN_PROMPTS = [
    "What is the capital of France?",
    "Give me three tips for staying focused while studying.",
    "Write a haiku about the ocean.",
    "Explain in two sentences what a neural network is.",
    "What is 12 times 7?",
]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="jaxinfer.run", description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_model_args(p)
    p.add_argument("--prompt", action="append", help="prompt text (repeatable)")
    p.add_argument("--input", help="JSONL file of requests")
    p.add_argument("--output", help="write results as JSONL (input order)")
    p.add_argument(
        "--chat",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="render --prompt text with the model's chat template (default: when it has one)",
    )
    p.add_argument("--truncate", action="store_true", help="keep the last tokens of over-long prompts")
    s = p.add_argument_group("sampling (defaults for every request)")
    s.add_argument("--max-tokens", type=int, default=128)
    s.add_argument("--temperature", type=float, default=0.0)
    s.add_argument("--top-k", type=int, default=0)
    s.add_argument("--top-p", type=float, default=1.0)
    s.add_argument("--min-p", type=float, default=0.0)
    s.add_argument("--seed", type=int, default=None, help="default: each request draws one (reported in its output)")
    s.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    s.add_argument("--ignore-eos", action="store_true")
    return p


def read_requests(args, engine):
    """-> list of (id, Request | None, error | None) in input order."""
    from jaxinfer.engine.requests import RequestError
    from jaxinfer.request_builder import RequestBuilder

    builder = RequestBuilder.for_engine(engine)
    defaults = default_sampling(args)
    builder.params(defaults)  # the command line's defaults are refused once, not per line
    chat = args.chat if args.chat is not None else engine.tokenizer.has_chat_template
    if args.input:
        with open(args.input, encoding="utf-8") as f:
            items = [(n, line) for n, line in enumerate(f, 1) if line.strip()]
    else:
        items = [(n, json.dumps({"prompt": text})) for n, text in enumerate(args.prompt or BUILTIN_PROMPTS, 1)]
    out, first_line = [], {}  # request id -> the line that gave it first
    for n, line in items:
        where = f"line {n}: " if args.input else f"prompt {n}: "
        rid = str(n - 1)
        try:
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise RequestError(f"{where}malformed JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(obj, dict):
                raise RequestError(f"{where}expected a JSON object, got {type(obj).__name__}")
            rid = str(obj.pop("id", rid))
            if rid in first_line:  # results are matched to requests by id: a second one would never finish
                raise RequestError(f'{where}"id" {rid!r} repeats line {first_line[rid]}\'s: each request needs its own')
            prompt, messages = obj.pop("prompt", None), obj.pop("messages", None)
            req = builder.build(
                rid,
                text=prompt,
                messages=messages,
                params={**defaults, **obj},
                chat=chat,
                truncate=args.truncate,
                where=where,
                text_field="prompt",
                truncate_hint="; use --truncate to keep the last tokens",
            )
            out.append((rid, req, None))
        except RequestError as e:
            msg = str(e) if str(e).startswith(where) else where + str(e)
            out.append((rid, None, msg))
        first_line.setdefault(rid, n)  # a line refused keeps its id too: its record carries it
    return out


def default_sampling(args) -> dict:
    return dict(
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        min_p=args.min_p,
        seed=args.seed,
        stop=tuple(args.stop),
        ignore_eos=args.ignore_eos,
    )


def percentile(values, q):
    import numpy as np

    return float(np.percentile(values, q)) if values else float("nan")


def prefix_summary(status) -> str:
    if not status.prefix_lookup_tokens:
        return f"prefix cache: no lookups; prompt tokens computed {status.prompt_tokens_computed}"
    return (
        f"prefix cache: hit rate {100 * status.prefix_hit_rate:.1f}% ({status.prefix_hit_tokens} of "
        f"{status.prefix_lookup_tokens} prompt tokens)  prompt tokens computed {status.prompt_tokens_computed}"
        f"  cached pages {status.pages_cached}  evictions {status.prefix_evictions}"
    )


def speculation_summary(status) -> str:
    return (
        f"speculative decoding ({status.speculative}): {status.spec_windows} verify windows, "
        f"{status.spec_accepted} of {status.spec_proposed} proposals accepted "
        f"({100 * status.spec_acceptance_rate:.1f}%)"
    )


def summarize(results, elapsed: float, engine) -> str:
    from jaxinfer.engine import compile_counter

    ok = [r for r in results if r is not None]
    status = engine.status()
    prompt = sum(r.prompt_tokens for r in ok)
    gen = sum(r.completion_tokens for r in ok)
    ttft = [r.ttft_s * 1e3 for r in ok if r.ttft_s is not None]
    tpot = [
        (r.total_s - r.ttft_s) / (r.completion_tokens - 1) * 1e3
        for r in ok
        if r.ttft_s is not None and r.completion_tokens > 1
    ]
    lines = [
        f"requests {len(ok)}  prompt tokens {prompt}  generated tokens {gen}  wall {elapsed:.2f}s",
        f"TTFT ms p50 {percentile(ttft, 50):.1f} p90 {percentile(ttft, 90):.1f} p99 {percentile(ttft, 99):.1f}",
        f"TPOT ms p50 {percentile(tpot, 50):.1f} p99 {percentile(tpot, 99):.1f}",
        f"output tokens/s {gen / elapsed:.1f}  steps {status.steps}  preemptions {status.preemptions}"
        f"  compilations after warm-up {status.compilations_after_warmup}",
        prefix_summary(status),
        *([speculation_summary(status)] if status.speculative != "none" else []),
        engine.startup.line(),
        f"XLA compilations in this process {compile_counter.count()}"
        f" (persistent cache hits {compile_counter.cache_hits()})",
    ]
    from jaxinfer.perf import decode_mbu

    lines.append(decode_mbu(engine, elapsed))
    return "\n".join(lines)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose)
    if args.prompt and args.input:
        print("jaxinfer.run: error: use --prompt or --input, not both", file=sys.stderr)
        return 2
    with user_errors("jaxinfer.run", (OSError,)):
        from jaxinfer.engine.requests import SamplingParams

        writes = args.process_id in (None, 0)  # process 0 writes --output (others of a mesh may lack its folder)
        check_paths(args, inputs=("--input",), outputs=("--output",) if writes else ())  # before loading anything
        SamplingParams(**default_sampling(args)).validate()
        cluster = join_cluster(args)
        with cluster_scope(cluster, "jaxinfer.run"):
            engine = build_engine(args, cluster=cluster)
            if cluster is not None and not cluster.is_leader:
                from jaxinfer.multihost.replica import follow

                follow(engine, cluster)  # process 0 reads the input and writes the output
                return 0
            return run_batch(args, engine)


def run_batch(args, engine) -> int:
    """Runs the requests of --prompt/--input, prints or writes the results and the summary."""
    items = read_requests(args, engine)
    for _, _, err in items:
        if err:
            print(f"jaxinfer.run: error: {err}", file=sys.stderr)
    requests = [r for _, r, _ in items if r is not None]
    from tqdm import tqdm

    start = time.perf_counter()
    with tqdm(
        total=len(requests), desc="requests", unit="req", file=sys.stderr, disable=len(requests) < 8 or None
    ) as bar:
        results = engine.generate(requests, on_event=lambda ev: ev.result and bar.update(1))
    elapsed = time.perf_counter() - start
    by_id = {r.id: r for r in results}
    if args.output:
        with open(args.output, "w", encoding="utf-8") as f:
            for rid, req, err in items:
                f.write(
                    json.dumps(result_record(rid, req, by_id.get(rid) if req else None, err), ensure_ascii=False) + "\n"
                )
    else:
        for rid, req, _ in items:
            if req is not None:
                r = by_id[rid]
                seed = f", seed {r.seed}" if req.params.temperature > 0 else ""  # greedy needs none
                print(f"--- [{rid}] ({r.finish_reason}, {r.completion_tokens} tokens{seed})\n{r.text.strip()}")
    print(summarize(results, elapsed, engine), file=sys.stderr)
    return 2 if any(err for _, _, err in items) else 0


def result_record(rid, req, result, err) -> dict:
    if err is not None:
        return {"id": rid, "error": err}
    return {
        "id": rid,
        "text": result.text,
        "token_ids": result.token_ids,
        "finish_reason": result.finish_reason,
        "usage": {
            "prompt_tokens": result.prompt_tokens,
            "completion_tokens": result.completion_tokens,
            "cached_tokens": result.cached_tokens,
            "speculative_proposed": result.speculative_proposed,
            "speculative_accepted": result.speculative_accepted,
        },
        "seed": result.seed,
        "timings": {"ttft_s": result.ttft_s, "total_s": result.total_s},
        **({"logprobs": result.logprobs} if result.logprobs is not None else {}),
        **({"top_logprobs": result.top_logprobs} if result.top_logprobs is not None else {}),
        **({"prompt_logprobs": result.prompt_logprobs} if result.prompt_logprobs is not None else {}),
        **({"prompt_top_logprobs": result.prompt_top_logprobs} if result.prompt_top_logprobs is not None else {}),
    }


if __name__ == "__main__":
    raise SystemExit(main())
