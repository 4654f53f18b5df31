"""The batch job with and without the prefix cache on requests that share one long system prompt.

    python scripts/benchmark_prefix_cache.py --system-tokens 1024 --questions 32 --repeats 3

Writes a JSONL of `--questions` chat requests that share a system prompt of `--system-tokens` tokens
(cut to length with the model's tokenizer; `--keep-jsonl PATH` keeps it as a batch-job example),
then runs `python -m jaxinfer.run --input ...` as a subprocess with `--prefix-cache` and with
`--no-prefix-cache`, alternating, `--repeats` times each. From each run's summary it reads the
prompt tokens that ran through the model, the hit rate and TTFT p50/p90; it prints medians and the
ratios off / on. Models without a chat template get the system prompt and the question as one text.
Extra arguments after `--` go to every batch job (e.g. `-- --mesh 1x1 --compile-cache DIR`).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

TOPICS = [
    "the tides",
    "a bicycle's gears",
    "bread rising",
    "why the sky is blue",
    "how bees find flowers",
    "rainbows",
    "volcanoes",
    "the moon's phases",
]
GUIDE = (
    "You are the help desk assistant of the Riverside Public Library. Answer briefly and kindly. "
    "The library opens at nine in the morning and closes at eight in the evening on weekdays, and "
    "at five on weekends. Members may borrow up to twelve books, four films and two games at a time. "
    "Books are lent for three weeks, films for one week, and games for two weeks. A loan can be "
    "renewed twice unless another member has reserved the item. The reading room on the second floor "
    "is quiet at all times; group study rooms on the third floor can be booked for two hours a day. "
    "Printing costs ten cents a page in black and white and fifty cents in colour. "
)


def system_prompt(tokenizer, tokens: int) -> str:
    """The library guide repeated and cut to `tokens` tokens of `tokenizer`."""
    ids = tokenizer.encode(GUIDE * (tokens // 40 + 2), add_bos=False)[:tokens]
    return tokenizer.decode(ids)


def write_requests(path: str, tokenizer, system_tokens: int, questions: int, max_tokens: int) -> None:
    system = system_prompt(tokenizer, system_tokens)
    with open(path, "w", encoding="utf-8") as f:
        for i in range(questions):
            question = f"Question {i + 1}: in one sentence, what should I know about {TOPICS[i % len(TOPICS)]}?"
            line = {"id": f"q{i + 1}", "max_tokens": max_tokens, "ignore_eos": True}
            if tokenizer.has_chat_template:
                line["messages"] = [{"role": "system", "content": system}, {"role": "user", "content": question}]
            else:
                line["prompt"] = system + "\n" + question
            f.write(json.dumps(line) + "\n")


SUMMARY = {
    "ttft_p50_ms": r"TTFT ms p50 ([\d.]+)",
    "ttft_p90_ms": r"TTFT ms p50 [\d.]+ p90 ([\d.]+)",
    "prompt_tokens": r"prompt tokens (\d+)",
    "computed_tokens": r"prompt tokens computed (\d+)",
    "wall_s": r"wall ([\d.]+)s",
}


def batch_job(jsonl: str, out: str, cache: bool, extra: list[str]) -> dict:
    flag = "--prefix-cache" if cache else "--no-prefix-cache"
    cmd = [sys.executable, "-m", "jaxinfer.run", "--input", jsonl, "--output", out, flag, *extra]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=3600)
    if proc.returncode != 0:
        raise SystemExit(f"benchmark_prefix_cache: the batch job failed ({' '.join(cmd)}):\n{proc.stderr[-3000:]}")
    figures = {key: float(re.search(rx, proc.stderr).group(1)) for key, rx in SUMMARY.items()}
    hit = re.search(r"hit rate ([\d.]+)%", proc.stderr)
    figures["hit_rate"] = float(hit.group(1)) / 100 if hit else 0.0
    figures["cached_tokens"] = sum(json.loads(line)["usage"]["cached_tokens"] for line in open(out, encoding="utf-8"))
    return figures


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tokenizer", default=None, help="the batch jobs' model's tokenizer (default: SmolLM2's)")
    p.add_argument("--system-tokens", type=int, default=1024)
    p.add_argument("--questions", type=int, default=32)
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--keep-jsonl", default=None, help="also write the requests here (a batch-job example)")
    p.add_argument("--json", default=None)
    p.add_argument("job_args", nargs="*", metavar="-- ARG", help="passed to every jaxinfer command it runs (after --)")
    args = p.parse_args(argv)
    extra = list(args.job_args)
    for name in ("system_tokens", "questions", "max_tokens", "repeats"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} {getattr(args, name)} must be >= 1")
    from jaxinfer.checkpoint.default_model import smollm2_gguf_path
    from jaxinfer.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(args.tokenizer or smollm2_gguf_path())
    runs: dict[str, list[dict]] = {"on": [], "off": []}
    with tempfile.TemporaryDirectory() as tmp:
        jsonl = args.keep_jsonl or os.path.join(tmp, "requests.jsonl")
        write_requests(jsonl, tokenizer, args.system_tokens, args.questions, args.max_tokens)
        if "--max-context" not in extra:  # room for the system prompt, the template, a question and the answer
            extra += ["--max-context", str(-(-(args.system_tokens + 128 + args.max_tokens) // 256) * 256)]
        for i in range(args.repeats):
            for mode in ("off", "on") if i % 2 == 0 else ("on", "off"):  # alternating, so drift hits both
                runs[mode].append(batch_job(jsonl, os.path.join(tmp, f"{mode}{i}.jsonl"), mode == "on", extra))
                r = runs[mode][-1]
                print(
                    f"run {i + 1} cache {mode:3s}: prompt tokens {r['prompt_tokens']:.0f} computed "
                    f"{r['computed_tokens']:.0f}  hit rate {100 * r['hit_rate']:.1f}%  TTFT p50 "
                    f"{r['ttft_p50_ms']:.0f} ms p90 {r['ttft_p90_ms']:.0f} ms  wall {r['wall_s']:.1f} s",
                    flush=True,
                )
    median = {mode: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for mode, rs in runs.items()}
    on, off = median["on"], median["off"]
    result = {
        "system_tokens": args.system_tokens,
        "questions": args.questions,
        "median": median,
        "computed_reduction": 1 - on["computed_tokens"] / off["computed_tokens"],
        "ttft_p50_ratio": off["ttft_p50_ms"] / on["ttft_p50_ms"],
        "wall_ratio": off["wall_s"] / on["wall_s"],
        "runs": runs,
    }
    print(
        f"medians of {args.repeats}: prompt tokens computed {off['computed_tokens']:.0f} -> {on['computed_tokens']:.0f}"
        f" ({100 * result['computed_reduction']:.1f}% fewer); TTFT p50 {off['ttft_p50_ms']:.0f} -> "
        f"{on['ttft_p50_ms']:.0f} ms ({result['ttft_p50_ratio']:.2f}x lower); hit rate {100 * on['hit_rate']:.1f}%;"
        f" wall {off['wall_s']:.1f} -> {on['wall_s']:.1f} s"
    )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return result


if __name__ == "__main__":
    main()
