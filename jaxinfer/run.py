"""`python -m jaxinfer.run`: batch generation over prompts or a JSONL file, with a latency/throughput summary.

    python -m jaxinfer.run --mesh 2x4 --prompt "What is the capital of France?"
    python -m jaxinfer.run --input prompts.jsonl --output out.jsonl --temperature 0.7 --seed 1

Each JSONL line is an object with `prompt` (text) or `messages` (chat), optional `id` and optional
sampling parameters (max_tokens, temperature, top_k, top_p, min_p, seed, stop, stop_token_ids,
ignore_eos, logprobs). A bad line is reported (with its line number) and in the output file; the
others still run; the exit status is then 2.
"""
from __future__ import annotations

import argparse
import json
import sys
import time

from jaxinfer.cli_common import setup_logging, user_errors

BUILTIN_PROMPTS = [
    "What is the capital of France?",
    "Give me three tips for staying focused while studying.",
    "Write a haiku about the ocean.",
    "Explain in two sentences what a neural network is.",
    "What is 12 times 7?",
]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="jaxinfer.run", description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p)
    p.add_argument("--prompt", action="append", help="prompt text (repeatable)")
    p.add_argument("--input", help="JSONL file of requests")
    p.add_argument("--output", help="write results as JSONL (input order)")
    p.add_argument("--chat", action=argparse.BooleanOptionalAction, default=None,
                   help="render --prompt text with the model's chat template (default: when it has one)")
    p.add_argument("--truncate", action="store_true", help="keep the last tokens of over-long prompts")
    s = p.add_argument_group("sampling (defaults for every request)")
    s.add_argument("--max-tokens", type=int, default=128)
    s.add_argument("--temperature", type=float, default=0.0)
    s.add_argument("--top-k", type=int, default=0)
    s.add_argument("--top-p", type=float, default=1.0)
    s.add_argument("--min-p", type=float, default=0.0)
    s.add_argument("--seed", type=int, default=None)
    s.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    s.add_argument("--ignore-eos", action="store_true")
    return p


def add_model_args(p: argparse.ArgumentParser) -> None:
    """Flags shared by the batch job and the server."""
    p.add_argument("--mesh", default=None, help="2x4 (data x tensor), 1x2x4, data=2,tensor=4 or a preset "
                   "(default: 2x4 on CPU, all devices on tensor otherwise)")
    p.add_argument("--model", default=None, help="preset, native checkpoint dir, HF dir, .gguf or llama2.c .bin "
                   "(default: embedded SmolLM2-135M-Instruct)")
    p.add_argument("--tokenizer", default=None, help="tokenizer path when it is not inside or beside the model")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    e = p.add_argument_group("engine")
    e.add_argument("--max-slots", type=int, default=8)
    e.add_argument("--max-context", type=int, default=1024)
    e.add_argument("--prefill-chunk", type=int, default=256, help="most prompt tokens of one request per step")
    e.add_argument("--max-step-tokens", type=int, default=None,
                   help="tokens per data shard per step (default: max(--prefill-chunk, slots per shard))")
    e.add_argument("--page-size", type=int, default=16)
    e.add_argument("--kv-pages", type=int, default=None, help="KV pages per data shard")
    e.add_argument("--kv-memory-fraction", type=float, default=None)
    e.add_argument("--attention", default="auto", choices=["auto", "kernel", "native", "reference"],
                   help="auto: Pallas kernel on TPU, native C++ kernel on CPU, XLA elsewhere")
    e.add_argument("--layer-loop", default="auto", choices=["auto", "scan", "unrolled"],
                   help="auto: unrolled on CPU (faster there), scanned elsewhere (compile time independent of depth)")
    e.add_argument("--strict-no-recompile", action="store_true")
    e.add_argument("--compile-cache", default=None, help="directory for JAX's persistent compilation cache")
    p.add_argument("--verbose", action="store_true")


def engine_config(args):
    """The `EngineConfig` of the engine flags `add_model_args` declares (batch job, server, AOT)."""
    from jaxinfer.engine.engine import EngineConfig

    return EngineConfig(
        max_slots=args.max_slots, page_size=args.page_size, max_context=args.max_context,
        prefill_chunk=args.prefill_chunk, max_step_tokens=args.max_step_tokens, kv_pages=args.kv_pages,
        kv_memory_fraction=args.kv_memory_fraction, attention=args.attention, layer_loop=args.layer_loop,
        strict_no_recompile=args.strict_no_recompile)


def setup_engine(args):
    """Mesh, model, tokenizer and a warmed-up engine from parsed flags (shared with the server)."""
    import logging

    from jaxinfer.sharding import accelerator_present, ensure_host_devices, parse_mesh

    log = logging.getLogger("jaxinfer")
    # default: 2x4 host devices on a CPU-only machine, every accelerator on `tensor` otherwise
    mesh_spec = parse_mesh(args.mesh) if args.mesh else (None if accelerator_present() else parse_mesh("2x4"))
    ensure_host_devices(mesh_spec.size if mesh_spec else 1)
    import jax

    from jaxinfer.engine import compile_counter

    compile_counter.install()  # from the first compile on, so the summary's total is complete
    if args.compile_cache:
        from jaxinfer.aot.manifest import check_cache_dir
        from jaxinfer.cli_common import use_compile_cache

        check_cache_dir(args.compile_cache)  # refuses AOT output built for other versions or chips
        use_compile_cache(args.compile_cache)
    from jaxinfer.checkpoint.load import load_model
    from jaxinfer.engine.engine import Engine
    from jaxinfer.sharding import describe, make_mesh
    from jaxinfer.tokenizer import TokenizerError, load_tokenizer

    if mesh_spec is None:
        mesh_spec = parse_mesh(str(len(jax.devices())))
    mesh = make_mesh(mesh_spec)
    log.info("%s", describe(mesh))
    start = time.perf_counter()
    model = load_model(args.model, mesh, args.dtype)
    log.info("model %s (%s) loaded in %.1fs", model.config.name, model.source, time.perf_counter() - start)
    tok_path = args.tokenizer or model.tokenizer_path
    if not tok_path:
        raise TokenizerError(f"--tokenizer is required: no tokenizer found inside or beside {model.source}")
    tokenizer = load_tokenizer(tok_path)
    engine = Engine(model, tokenizer, engine_config(args))
    seconds = engine.warmup()
    log.info("warm-up compiled %d buckets in %.2fs", len(engine.buckets), seconds)
    return engine


def read_requests(args, engine):
    """-> list of (id, Request | None, error | None) in input order."""
    from jaxinfer.engine.requests import Request, RequestError, SamplingParams

    defaults = default_sampling(args)
    SamplingParams(**defaults).validate(max_tokens_limit=engine.config.max_context)
    tok = engine.tokenizer
    chat = args.chat if args.chat is not None else tok.has_chat_template
    items = []
    if args.input:
        with open(args.input, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if line.strip():
                    items.append((n, line))
    else:
        for n, text in enumerate(args.prompt or BUILTIN_PROMPTS, 1):
            items.append((n, json.dumps({"prompt": text})))
    out = []
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
            prompt, messages = obj.pop("prompt", None), obj.pop("messages", None)
            params = SamplingParams.from_dict({**defaults, **obj}, where=where)
            if (prompt is None) == (messages is None):
                raise RequestError(f"{where}needs exactly one of 'prompt' or 'messages'")
            if messages is not None:
                ids = tok.encode_chat(messages)
            elif not isinstance(prompt, str):
                raise RequestError(f"{where}prompt must be a string")
            elif chat:
                ids = tok.encode_chat([{"role": "user", "content": prompt}])
            else:
                ids = tok.encode(prompt)
            limit = engine.max_prompt_tokens
            if len(ids) > limit:
                if not args.truncate:
                    raise RequestError(f"{where}prompt has {len(ids)} tokens, above the limit of {limit} "
                                       f"(--max-context {engine.config.max_context}); use --truncate to keep the last {limit}")
                ids = ids[-limit:]
            req = Request(rid, ids, params)
            engine.validate(req)
            out.append((rid, req, None))
        except ValueError as e:
            msg = str(e) if str(e).startswith(where) else where + str(e)
            out.append((rid, None, msg))
    return out


def default_sampling(args) -> dict:
    return dict(max_tokens=args.max_tokens, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                min_p=args.min_p, seed=args.seed, stop=tuple(args.stop), ignore_eos=args.ignore_eos)


def percentile(values, q):
    import numpy as np

    return float(np.percentile(values, q)) if values else float("nan")


def summarize(results, elapsed: float, engine) -> str:
    from jaxinfer.engine import compile_counter

    ok = [r for r in results if r is not None]
    prompt = sum(r.prompt_tokens for r in ok)
    gen = sum(r.completion_tokens for r in ok)
    ttft = [r.ttft_s * 1e3 for r in ok if r.ttft_s is not None]
    tpot = [(r.total_s - r.ttft_s) / (r.completion_tokens - 1) * 1e3 for r in ok
            if r.ttft_s is not None and r.completion_tokens > 1]
    lines = [
        f"requests {len(ok)}  prompt tokens {prompt}  generated tokens {gen}  wall {elapsed:.2f}s",
        f"TTFT ms p50 {percentile(ttft, 50):.1f} p90 {percentile(ttft, 90):.1f} p99 {percentile(ttft, 99):.1f}",
        f"TPOT ms p50 {percentile(tpot, 50):.1f} p99 {percentile(tpot, 99):.1f}",
        f"output tokens/s {gen / elapsed:.1f}  steps {engine.stats['steps']}  preemptions {engine.stats['preemptions']}"
        f"  compilations after warm-up {engine.compilations_after_warmup}",
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

        SamplingParams(**default_sampling(args)).validate()  # fail fast, before loading anything
        engine = setup_engine(args)
        items = read_requests(args, engine)
        for _, _, err in items:
            if err:
                print(f"jaxinfer.run: error: {err}", file=sys.stderr)
        requests = [r for _, r, _ in items if r is not None]
        from tqdm import tqdm

        start = time.perf_counter()
        with tqdm(total=len(requests), desc="requests", unit="req", file=sys.stderr,
                  disable=len(requests) < 8 or None) as bar:
            results = engine.generate(requests, on_event=lambda ev: ev.result and bar.update(1))
        elapsed = time.perf_counter() - start
        by_id = {r.id: r for r in results}
        if args.output:
            with open(args.output, "w", encoding="utf-8") as f:
                for rid, req, err in items:
                    f.write(json.dumps(result_record(rid, req, by_id.get(rid) if req else None, err),
                                       ensure_ascii=False) + "\n")
        else:
            for rid, req, err in items:
                if req is not None:
                    r = by_id[rid]
                    print(f"--- [{rid}] ({r.finish_reason}, {r.completion_tokens} tokens)\n{r.text.strip()}")
        print(summarize(results, elapsed, engine), file=sys.stderr)
        return 2 if any(err for _, _, err in items) else 0


def result_record(rid, req, result, err) -> dict:
    if err is not None:
        return {"id": rid, "error": err}
    return {"id": rid, "text": result.text, "token_ids": result.token_ids, "finish_reason": result.finish_reason,
            "usage": {"prompt_tokens": result.prompt_tokens, "completion_tokens": result.completion_tokens},
            "timings": {"ttft_s": result.ttft_s, "total_s": result.total_s},
            **({"logprobs": result.logprobs} if result.logprobs is not None else {})}


if __name__ == "__main__":
    raise SystemExit(main())
