"""Load test of a running `jaxinfer.serve`: latency percentiles, throughput and goodput under an SLO.

    python scripts/benchmark_serving.py --target localhost:50051 --num-requests 200 \
        --prompt-len uniform:32:512 --output-len fixed:128 --rates 1 2 4 inf --slo-ttft-ms 500 \
        --slo-tpot-ms 50 --json out.json --plot out.png
    python scripts/benchmark_serving.py --target http://localhost:8000 ...   # the OpenAI HTTP API

`--target` is the gRPC address, or the HTTP API's base URL (streamed /v1/completions, or
/v1/chat/completions with --chat).

Requests carry token ids (random ids of the requested lengths) or, with `--dataset prompts.jsonl`,
the `prompt` text of each line. Prefix-cache workloads:
  --shared-prefix N --prefix-groups G   every prompt starts with one of G random prefixes of N tokens;
  --turns T                             each of the requests is a conversation of T turns, sent one
                                        after another: turn k+1 is turn k's prompt and answer plus
                                        --prompt-len new tokens (with --chat, a message list whose
                                        assistant turns are the answers' text, and the chat template);
each run then also reports the prompt tokens served from the prefix cache (`usage.cached_tokens`),
overall and per turn. `--rates` are Poisson arrival rates in requests/s (`inf` sends
everything at once); each rate is one run. Per run: TTFT, time per output token (TPOT, after the
first) and inter-token latency (ITL, between streamed chunks, per token), p50/p90/p99 in ms;
request throughput; input and output tokens/s; goodput (requests/s meeting both SLOs).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import sys
import threading
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def length_sampler(spec: str):
    """'fixed:N' or 'uniform:A:B' -> function(rng) -> int."""
    parts = spec.split(":")
    try:
        if parts[0] == "fixed" and len(parts) == 2:
            n = int(parts[1])
            return lambda rng: n
        if parts[0] == "uniform" and len(parts) == 3:
            a, b = int(parts[1]), int(parts[2])
            if 1 <= a <= b:
                return lambda rng: rng.randint(a, b)
    except ValueError:
        pass
    raise SystemExit(f"benchmark_serving: error: length {spec!r}: expected fixed:N or uniform:A:B with 1 <= A <= B")


def percentiles(values) -> dict:
    if not values:
        return {"p50": None, "p90": None, "p99": None, "mean": None}
    arr = np.asarray(values, np.float64)
    return {
        "p50": float(np.percentile(arr, 50)),
        "p90": float(np.percentile(arr, 90)),
        "p99": float(np.percentile(arr, 99)),
        "mean": float(arr.mean()),
    }


class GrpcTarget:
    """The Generation service: one streaming Generate call per request."""

    def __init__(self, address: str):
        import grpc

        from jaxinfer.proto import jaxinfer_pb2 as pb
        from jaxinfer.proto import jaxinfer_pb2_grpc

        self.pb, self.channel = pb, grpc.insecure_channel(address)
        self.stub = jaxinfer_pb2_grpc.GenerationStub(self.channel)
        info = self.stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=30)
        self.model, self.platform, self.vocab_size = info.model_name, info.platform, info.config.vocab_size

    def stream(self, prompt: dict, max_tokens: int):
        """Yields (new token ids, new text, usage dict or None) per response of one request."""
        pb = self.pb
        params = pb.SamplingParams(max_tokens=max_tokens, ignore_eos=True)
        if "messages" in prompt:
            request = pb.GenerateRequest(messages=[pb.ChatMessage(**m) for m in prompt["messages"]], params=params)
        else:
            request = pb.GenerateRequest(**prompt, params=params)
        for r in self.stub.Generate(request, timeout=600):
            usage = r.usage if r.HasField("usage") else None
            yield (
                list(r.token_ids),
                r.text,
                ({"prompt_tokens": usage.prompt_tokens, "cached_tokens": usage.cached_tokens} if usage else None),
            )

    def answer_ids(self, record: dict) -> list[int]:
        return record["output_ids"]

    def close(self):
        self.channel.close()


class HttpTarget:
    """The OpenAI-compatible HTTP API: one streamed /v1/completions (or chat) request per request."""

    def __init__(self, url: str):
        import httpx2 as httpx

        self.http = httpx.Client(base_url=url, timeout=600, limits=httpx.Limits(max_connections=1024))
        card = self.http.get("/v1/models").raise_for_status().json()["data"][0]
        self.model, self.platform, self.vocab_size = card["id"], "http", card["vocab_size"]

    def stream(self, prompt: dict, max_tokens: int):
        body = {"model": self.model, "max_tokens": max_tokens, "temperature": 0.0, "ignore_eos": True, "stream": True}
        body["stream_options"] = {"include_usage": True}
        chat = "messages" in prompt
        if chat:
            path, body["messages"] = "/v1/chat/completions", prompt["messages"]
        else:
            path, body["prompt"] = "/v1/completions", prompt.get("text", prompt.get("token_ids"))
        with self.http.stream("POST", path, json=body) as r:
            if r.status_code != 200:
                raise RuntimeError(f"HTTP {r.status_code}: {r.read()[:200]!r}")
            for line in r.iter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                data = json.loads(line[6:])
                text = "".join((c["delta"].get("content") or "") if chat else c["text"] for c in data["choices"])
                usage = data.get("usage")
                cached = ((usage or {}).get("prompt_tokens_details") or {}).get("cached_tokens", 0)
                # a chunk carries one token (the server streams token by token; ids are not sent); the usage chunk none
                yield (
                    ([None] if data["choices"] and text else []),
                    text,
                    ({"prompt_tokens": usage["prompt_tokens"], "cached_tokens": cached} if usage else None),
                )

    def answer_ids(self, record: dict) -> list[int]:
        """The answer's text tokenized by the server (OpenAI streams carry no token ids)."""
        body = {"model": self.model, "prompt": record["output_text"], "add_special_tokens": False}
        return self.http.post("/tokenize", json=body).raise_for_status().json()["tokens"]

    def close(self):
        self.http.close()


def open_target(target: str):
    return HttpTarget(target) if target.startswith(("http://", "https://")) else GrpcTarget(target)


def one_request(target, prompt: dict, max_tokens: int, record: dict) -> None:
    """Streams one request, recording the arrival time of every chunk that carries tokens."""
    start = time.perf_counter()
    chunks, tokens, usage, text, ids = [], 0, None, [], []
    try:
        for new_ids, piece, got_usage in target.stream(prompt, max_tokens):
            if new_ids:
                chunks.append((time.perf_counter(), len(new_ids)))
                tokens += len(new_ids)
                ids += new_ids
            text.append(piece)
            usage = got_usage or usage
        record.update(
            ok=True,
            start=start,
            chunks=chunks,
            tokens=tokens,
            prompt_tokens=usage["prompt_tokens"] if usage else 0,
            cached_tokens=usage["cached_tokens"] if usage else 0,
            output_ids=ids,
            output_text="".join(text),
        )
    except Exception as e:  # a failed request is counted, not fatal
        record.update(ok=False, error=str(e).splitlines()[0])


def run_conversation(target, conv: dict, records: list[dict]) -> None:
    """Sends the turns of `conv` one after another, each with the history so far; a failed turn ends it.
    A token-id turn continues the previous prompt with the answer's ids (over HTTP, which streams no
    ids, the answer's text as the server tokenizes it)."""
    history, messages = list(conv.get("prefix", [])), list(conv.get("system", []))
    for k, (new, max_tokens) in enumerate(conv["turns"]):
        if conv.get("chat"):
            messages.append(dict(role="user", content=new))
            prompt = {"messages": list(messages)}
        elif isinstance(new, str):
            prompt = {"text": new}
        else:
            history += new
            prompt = {"token_ids": list(history)}
        record = dict(turn=k)
        records.append(record)
        one_request(target, prompt, max_tokens, record)
        if not record["ok"]:
            return
        messages.append(dict(role="assistant", content=record["output_text"]))
        if "token_ids" in prompt and k + 1 < len(conv["turns"]):
            history += target.answer_ids(record)


def run_rate(target, conversations, rate: float, seed: int, slo_ttft_ms, slo_tpot_ms) -> dict:
    rng = random.Random(seed)
    per_conv = [[] for _ in conversations]
    threads = []
    begin = time.perf_counter()
    for conv, recs in zip(conversations, per_conv):
        t = threading.Thread(target=run_conversation, args=(target, conv, recs), daemon=True)
        t.start()
        threads.append(t)
        if math.isfinite(rate):
            time.sleep(rng.expovariate(rate))
    for t in threads:
        t.join()
    records = [r for recs in per_conv for r in recs]
    requests = sum(len(c["turns"]) for c in conversations)
    duration = time.perf_counter() - begin
    done = [r for r in records if r.get("ok") and r["chunks"]]
    turns = [r["turn"] for r in done]
    ttft = [(r["chunks"][0][0] - r["start"]) * 1e3 for r in done]
    tpot = [(r["chunks"][-1][0] - r["chunks"][0][0]) * 1e3 / (r["tokens"] - 1) for r in done if r["tokens"] > 1]
    itl = [(b[0] - a[0]) * 1e3 / b[1] for r in done for a, b in zip(r["chunks"], r["chunks"][1:])]
    good = 0
    for r in done:
        first = (r["chunks"][0][0] - r["start"]) * 1e3
        per = (r["chunks"][-1][0] - r["chunks"][0][0]) * 1e3 / max(r["tokens"] - 1, 1)
        good += (slo_ttft_ms is None or first <= slo_ttft_ms) and (slo_tpot_ms is None or per <= slo_tpot_ms)
    return {
        "rate": rate if math.isfinite(rate) else "inf",
        "requests": requests,
        "completed": len(done),
        "failed": requests - len(done),
        "duration_s": duration,
        "request_throughput": len(done) / duration,
        "input_tokens_per_s": sum(r["prompt_tokens"] for r in done) / duration,
        "output_tokens_per_s": sum(r["tokens"] for r in done) / duration,
        "ttft_ms": percentiles(ttft),
        "tpot_ms": percentiles(tpot),
        "itl_ms": percentiles(itl),
        "slo": {"ttft_ms": slo_ttft_ms, "tpot_ms": slo_tpot_ms},
        "goodput": good / duration,
        "errors": sorted({r["error"] for r in records if not r.get("ok")})[:5],
        "cached_tokens": sum(r["cached_tokens"] for r in done),
        "prefix_hit_rate": hit_rate(done),
        "hit_rate_by_turn": [hit_rate([r for r in done if r["turn"] == k]) for k in range(max(turns, default=0) + 1)],
    }


def hit_rate(records) -> float | None:
    prompt = sum(r["prompt_tokens"] for r in records)
    return sum(r["cached_tokens"] for r in records) / prompt if prompt else None


def build_conversations(args, vocab: int) -> list[dict]:
    """One conversation per --num-requests: its turns (new token ids, text, or a user message) and output lengths."""
    rng = random.Random(args.seed)
    out_len, in_len = length_sampler(args.output_len), length_sampler(args.prompt_len)
    texts = None
    if args.dataset:
        with open(args.dataset, encoding="utf-8") as f:
            texts = [json.loads(line)["prompt"] for line in f if line.strip()]
    prefixes = [[rng.randrange(10, vocab) for _ in range(args.shared_prefix)] for _ in range(args.prefix_groups)]
    convs = []
    for i in range(args.num_requests):
        conv: dict = {"turns": []}
        if args.chat:
            conv["chat"] = True
            if args.system:
                conv["system"] = [dict(role="system", content=args.system)]
        elif args.shared_prefix:
            conv["prefix"] = list(prefixes[i % args.prefix_groups])
        for k in range(args.turns):
            if args.chat:
                new = " ".join(rng.choice(WORDS) for _ in range(in_len(rng)))
            elif texts is not None:
                new = texts[(i * args.turns + k) % len(texts)]
            else:
                new = [rng.randrange(10, vocab) for _ in range(in_len(rng))]
            conv["turns"].append((new, out_len(rng)))
        convs.append(conv)
    return convs


WORDS = "the a river library book morning quiet garden window friend question answer light small".split()


def fmt_rate(rate) -> str:
    return "-" if rate is None else f"{100 * rate:.1f}%"


def plot(results, path: str) -> None:
    try:
        import matplotlib
    except ImportError:
        raise SystemExit("benchmark_serving: error: --plot needs matplotlib (pip install matplotlib)") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    finite = [r for r in results if r["rate"] != "inf"]
    rates = [r["rate"] for r in finite]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, key, title in ((axes[0], "ttft_ms", "TTFT"), (axes[1], "tpot_ms", "time per output token")):
        for q in ("p50", "p90", "p99"):
            ax.plot(rates, [r[key][q] for r in finite], marker="o", label=q)
        ax.set(xlabel="request rate (req/s)", ylabel="ms", title=title)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--target", default="localhost:50051", help="gRPC host:port, or http(s)://host:port for HTTP")
    p.add_argument("--num-requests", type=int, default=100)
    p.add_argument("--prompt-len", default="fixed:128")
    p.add_argument("--output-len", default="fixed:128")
    p.add_argument("--dataset", default=None, help="JSONL with a 'prompt' per line")
    p.add_argument("--rates", type=float, nargs="+", default=[math.inf])
    p.add_argument("--slo-ttft-ms", type=float, default=None)
    p.add_argument("--slo-tpot-ms", type=float, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--shared-prefix", type=int, default=0, help="tokens of random prefix shared within a group")
    p.add_argument("--prefix-groups", type=int, default=1)
    p.add_argument("--turns", type=int, default=1, help="turns per conversation (each request is one)")
    p.add_argument("--chat", action="store_true", help="conversations as chat messages (--prompt-len in words)")
    p.add_argument("--system", default="", help="with --chat: a system message every conversation starts with")
    p.add_argument("--json", default=None)
    p.add_argument("--plot", default=None)
    args = p.parse_args(argv)
    for name in ("num_requests", "prefix_groups", "turns"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} {getattr(args, name)} must be >= 1")
    if args.shared_prefix < 0:
        p.error(f"--shared-prefix {args.shared_prefix} must be >= 0")
    if args.dataset and (args.chat or args.shared_prefix):
        p.error("--dataset cannot be combined with --chat or --shared-prefix")
    target = open_target(args.target)
    results = []
    try:
        for rate in args.rates:
            convs = build_conversations(args, target.vocab_size)
            results.append(run_rate(target, convs, rate, args.seed, args.slo_ttft_ms, args.slo_tpot_ms))
            r = results[-1]
            print(
                f"rate {r['rate']}: {r['completed']}/{r['requests']} ok  {r['request_throughput']:.2f} req/s  "
                f"out {r['output_tokens_per_s']:.1f} tok/s  TTFT p50/p99 {r['ttft_ms']['p50']:.1f}/"
                f"{r['ttft_ms']['p99']:.1f} ms  TPOT p50/p99 {r['tpot_ms']['p50']:.1f}/{r['tpot_ms']['p99']:.1f} ms  "
                f"goodput {r['goodput']:.2f} req/s  prefix hit rate {fmt_rate(r['prefix_hit_rate'])}"
                + (f" (by turn {' '.join(fmt_rate(h) for h in r['hit_rate_by_turn'])})" if args.turns > 1 else ""),
                flush=True,
            )
    finally:
        target.close()
    out = {"target": args.target, "model": target.model, "platform": target.platform, "results": results}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)
    if args.plot:
        plot(results, args.plot)
    return out


if __name__ == "__main__":
    main()
