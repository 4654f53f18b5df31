"""Soak test of a running `jaxinfer.serve` over both protocols: N requests mixing HTTP and gRPC,
streaming and unary, with cancellations, deadlines, disconnects and malformed requests.

    python scripts/soak.py --grpc localhost:50051 --http http://localhost:8000 --requests 10000 \
        --concurrency 48 --server-pid $(pgrep -f jaxinfer.serve) --json soak.json

Every request is drawn from a seeded mix. Good requests (greedy, or sampled with a seed) must each get
exactly one complete answer: one final response (or stream chunk) with a finish reason, nothing after
it, a token count that agrees with usage, and, for one prompt and set of parameters, the same text as
every other request like it, whatever the protocol or the batch it ran in. Cancelled and disconnected
requests may end anyhow but must leave nothing behind; malformed ones must get 400 / INVALID_ARGUMENT;
requests with a short deadline either finish completely or get DEADLINE_EXCEEDED.

Afterwards, once the server is idle: no slot busy, no KV page referenced (every page free or in the
prefix cache), zero XLA compilations since warm-up, and (with --server-pid) resident memory grown by
less than --max-rss-growth between the server going idle after the first --warmup-requests requests
and going idle after the last. One line per check;
exit status 1 when any fails.
"""

from __future__ import annotations

import argparse
import collections
import concurrent.futures
import json
import os
import random
import re
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

PROMPTS = [
    "Once upon a time",
    "The little dog ran to the park and",
    "Lily wanted to play with her friend Ben, but",
    "One day, a bird",
    "The sun was hot and the children",
    "Tom had a big red ball. He",
]
KINDS = {  # kind -> weight in the mix
    "grpc_unary": 14,
    "grpc_stream": 14,
    "http_completion": 12,
    "http_completion_stream": 12,
    "http_chat": 10,
    "http_chat_stream": 10,
    "grpc_cancel": 5,
    "http_disconnect": 5,
    "grpc_deadline": 6,
    "http_malformed": 7,
    "grpc_malformed": 5,
}
MALFORMED_HTTP = [  # (body bytes, path)
    (b'{"prompt": "hi", ', "/v1/completions"),
    (json.dumps({"prompt": "hi", "temperature": -1}).encode(), "/v1/completions"),
    (json.dumps({"prompt": "hi", "max_tokens": "many"}).encode(), "/v1/completions"),
    (json.dumps({"messages": "hello"}).encode(), "/v1/chat/completions"),
    (
        json.dumps({"messages": [{"role": "user", "content": "hi"}], "top_logprobs": 99}).encode(),
        "/v1/chat/completions",
    ),
    (json.dumps({"prompt": "hi", "logit_bias": {"99999999": 1}}).encode(), "/v1/completions"),
]


class Outcome:
    """What happened to one request, and the answer's text when it completed."""

    def __init__(self, index: int, kind: str, key: tuple | None):
        self.index, self.kind, self.key = index, kind, key
        self.status = "pending"  # ok | expected_error | failed
        self.text: str | None = None
        self.answer_id: str | None = None
        self.problem: str | None = None

    def fail(self, problem: str) -> None:
        self.status, self.problem = "failed", problem


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="soak", description=__doc__.split("\n")[0])
    p.add_argument("--grpc", default="localhost:50051", help="gRPC address")
    p.add_argument("--http", default="http://localhost:8000", help="HTTP base URL")
    p.add_argument("--requests", type=int, default=500)
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--max-tokens", type=int, default=16, help="largest max_tokens of a good request")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--api-key", default=os.environ.get("JAXINFER_API_KEY"))
    p.add_argument("--server-pid", type=int, default=None, help="the server's pid, for its resident memory")
    p.add_argument("--warmup-requests", type=int, default=None, help="default: 10%% of --requests")
    p.add_argument("--max-rss-growth", type=float, default=0.10)
    p.add_argument("--idle-timeout", type=float, default=60.0, help="seconds to wait for the server to go idle")
    p.add_argument("--json", default=None, help="write the summary here")
    args = p.parse_args(argv)
    for flag in ("requests", "concurrency", "max_tokens"):
        if getattr(args, flag) < 1:
            p.error(f"--{flag.replace('_', '-')} {getattr(args, flag)} must be >= 1")
    return args


class Soak:
    def __init__(self, args):
        import grpc
        import httpx2 as httpx

        from jaxinfer.proto import jaxinfer_pb2 as pb
        from jaxinfer.proto import jaxinfer_pb2_grpc as pb_grpc

        self.args, self.pb, self.grpc = args, pb, grpc
        self.metadata = (("authorization", f"Bearer {args.api_key}"),) if args.api_key else ()
        headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
        limits = httpx.Limits(max_connections=args.concurrency + 4, max_keepalive_connections=args.concurrency + 4)
        self.http = httpx.Client(base_url=args.http, headers=headers, timeout=120.0, limits=limits)
        self.channel = grpc.insecure_channel(args.grpc)
        self.stub = pb_grpc.GenerationStub(self.channel)
        self.model = self.http.get("/v1/models").json()["data"][0]["id"]

    # ---- one request of each kind -----------------------------------------------------------------
    def run_one(self, index: int, kind: str, rng: random.Random) -> Outcome:
        prompt = rng.choice(PROMPTS)
        sampled = rng.random() < 0.3
        params = {"max_tokens": rng.randint(1, self.args.max_tokens)}
        if sampled:
            params.update(temperature=0.8, top_p=0.95, seed=rng.randrange(4))
        chat = kind.startswith("http_chat")
        key = (prompt, chat, tuple(sorted(params.items())))
        out = Outcome(index, kind, key)
        try:
            getattr(self, kind)(out, prompt, params, rng)
        except Exception as e:  # anything unexpected is a failure of that request, reported with the rest
            out.fail(f"{type(e).__name__}: {str(e)[:200]}")
        if out.status == "pending":
            out.fail("no outcome recorded")
        return out

    def _grpc_request(self, out, prompt, params):
        pb = self.pb
        return pb.GenerateRequest(request_id=f"soak-{out.index}", text=prompt, params=pb.SamplingParams(**params))

    def _finish_grpc(self, out, token_ids: list, text: str, final, finals: int):
        pb = self.pb
        if finals != 1:
            return out.fail(f"{finals} final responses")
        if final.finish_reason not in (pb.FINISH_REASON_STOP, pb.FINISH_REASON_LENGTH):
            return out.fail(f"finish_reason {pb.FinishReason.Name(final.finish_reason)}")
        if final.usage.completion_tokens != len(token_ids):
            return out.fail(f"usage says {final.usage.completion_tokens} tokens, got {len(token_ids)}")
        if final.request_id != f"soak-{out.index}":
            return out.fail(f"answer for {final.request_id!r}")
        out.status, out.text, out.answer_id = "ok", text, final.request_id

    def grpc_unary(self, out, prompt, params, rng):
        r = self.stub.GenerateUnary(self._grpc_request(out, prompt, params), metadata=self.metadata, timeout=120)
        self._finish_grpc(out, list(r.token_ids), r.text, r, 1)

    def grpc_stream(self, out, prompt, params, rng):
        ids, text, final, finals = [], [], None, 0
        for r in self.stub.Generate(self._grpc_request(out, prompt, params), metadata=self.metadata, timeout=120):
            if final is not None:
                return out.fail("a response after the final one")
            ids += r.token_ids
            text.append(r.text)
            if r.finish_reason:
                final, finals = r, finals + 1
        if final is None:
            return out.fail("the stream ended without a final response")
        self._finish_grpc(out, ids, "".join(text), final, finals)

    def grpc_cancel(self, out, prompt, params, rng):
        out.key = None
        call = self.stub.Generate(
            self._grpc_request(out, prompt, {**params, "max_tokens": self.args.max_tokens}),
            metadata=self.metadata,
            timeout=120,
        )
        for _ in call:
            break
        call.cancel()
        out.status = "expected_error"

    def grpc_deadline(self, out, prompt, params, rng):
        try:
            r = self.stub.GenerateUnary(
                self._grpc_request(out, prompt, params), metadata=self.metadata, timeout=rng.uniform(0.005, 0.3)
            )
        except self.grpc.RpcError as e:
            if e.code() == self.grpc.StatusCode.DEADLINE_EXCEEDED:
                out.status, out.key = "expected_error", None
                return
            raise
        self._finish_grpc(out, list(r.token_ids), r.text, r, 1)

    def grpc_malformed(self, out, prompt, params, rng):
        out.key = None
        bad = rng.choice([dict(top_p=1.5), dict(temperature=-2.0), dict(max_tokens=0), dict(presence_penalty=9.0)])
        request = self.pb.GenerateRequest(text=prompt, params=self.pb.SamplingParams(**bad))
        try:
            self.stub.GenerateUnary(request, metadata=self.metadata, timeout=30)
        except self.grpc.RpcError as e:
            if e.code() == self.grpc.StatusCode.INVALID_ARGUMENT:
                out.status = "expected_error"
                return
            return out.fail(f"malformed request got {e.code().name}: {e.details()}")
        out.fail("a malformed request was answered")

    def _http_body(self, prompt, params, chat: bool, stream: bool) -> tuple[str, dict]:
        # OpenAI's default temperature is 1 (gRPC's 0): a greedy request says so, to match its gRPC twin
        body = {"model": self.model, "temperature": 0.0, **params, "stream": stream}
        if stream:
            body["stream_options"] = {"include_usage": True}
        if chat:
            return "/v1/chat/completions", {**body, "messages": [{"role": "user", "content": prompt}]}
        return "/v1/completions", {**body, "prompt": prompt}

    def _finish_http(self, out, choice_text: str, finish_reason, usage, tokens: int | None, answer_id: str):
        if finish_reason not in ("stop", "length"):
            return out.fail(f"finish_reason {finish_reason!r}")
        if usage is None:
            return out.fail("no usage")
        if tokens is not None and usage["completion_tokens"] != tokens:
            return out.fail(f"usage says {usage['completion_tokens']} tokens, the stream carried {tokens}")
        out.status, out.text, out.answer_id = "ok", choice_text, answer_id

    def _unary_http(self, out, prompt, params, chat):
        path, body = self._http_body(prompt, params, chat, stream=False)
        r = self.http.post(path, json=body)
        if r.status_code != 200:
            return out.fail(f"HTTP {r.status_code}: {r.text[:200]}")
        data = r.json()
        if len(data["choices"]) != 1:
            return out.fail(f"{len(data['choices'])} choices")
        choice = data["choices"][0]
        text = choice["message"]["content"] if chat else choice["text"]
        self._finish_http(out, text, choice["finish_reason"], data.get("usage"), None, data["id"])

    def _stream_http(self, out, prompt, params, chat, disconnect: bool = False):
        path, body = self._http_body(prompt, params, chat, stream=True)
        text, finishes, usage, chunks, answer_ids, done = [], [], None, 0, set(), False
        with self.http.stream("POST", path, json=body) as r:
            if r.status_code != 200:
                return out.fail(f"HTTP {r.status_code}: {r.read()[:200]!r}")
            for line in r.iter_lines():
                if not line.startswith("data: "):
                    continue
                if done:
                    return out.fail("data after [DONE]")
                if line == "data: [DONE]":
                    done = True
                    continue
                data = json.loads(line[6:])
                answer_ids.add(data["id"])
                if finishes and data["choices"]:
                    return out.fail("a choice chunk after the finish reason")
                for choice in data["choices"]:
                    piece = choice["delta"].get("content") if chat else choice["text"]
                    if piece:
                        text.append(piece)
                        chunks += 1
                    if choice.get("finish_reason"):
                        finishes.append(choice["finish_reason"])
                usage = data.get("usage") or usage
                if disconnect:
                    out.status, out.key = "expected_error", None
                    return  # leaving the block closes the connection mid-stream
        if not done:
            return out.fail("the stream ended without [DONE]")
        if len(finishes) != 1 or len(answer_ids) != 1:
            return out.fail(f"{len(finishes)} finish reasons, {len(answer_ids)} ids")
        self._finish_http(out, "".join(text), finishes[0], usage, None, answer_ids.pop())

    def http_completion(self, out, prompt, params, rng):
        self._unary_http(out, prompt, params, chat=False)

    def http_chat(self, out, prompt, params, rng):
        self._unary_http(out, prompt, params, chat=True)

    def http_completion_stream(self, out, prompt, params, rng):
        self._stream_http(out, prompt, params, chat=False)

    def http_chat_stream(self, out, prompt, params, rng):
        self._stream_http(out, prompt, params, chat=True)

    def http_disconnect(self, out, prompt, params, rng):
        self._stream_http(out, prompt, {**params, "max_tokens": self.args.max_tokens}, chat=False, disconnect=True)

    def http_malformed(self, out, prompt, params, rng):
        out.key = None
        body, path = rng.choice(MALFORMED_HTTP)
        r = self.http.post(path, content=body, headers={"Content-Type": "application/json"})
        if r.status_code == 400 and "error" in r.json():
            out.status = "expected_error"
        else:
            out.fail(f"malformed request got HTTP {r.status_code}: {r.text[:200]}")

    # ---- the server's state -------------------------------------------------------------------------
    def info(self):
        return self.stub.GetModelInfo(self.pb.GetModelInfoRequest(), metadata=self.metadata, timeout=10)

    def metric(self, name: str) -> float | None:
        for line in self.http.get("/metrics").text.splitlines():
            m = re.match(rf"{name}(?:_total)?(?:{{[^}}]*}})? ([0-9.e+-]+)$", line)
            if m:
                return float(m.group(1))
        return None

    def wait_idle(self):
        deadline = time.monotonic() + self.args.idle_timeout
        while True:
            info = self.info()
            if (info.active_slots == 0 and info.queue_depth == 0) or time.monotonic() > deadline:
                return info
            time.sleep(0.2)


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise ValueError(f"no VmRSS for pid {pid}")


def main(argv=None) -> int:
    args = parse_args(argv)
    soak = Soak(args)
    rng = random.Random(args.seed)
    kinds = rng.choices(list(KINDS), weights=list(KINDS.values()), k=args.requests)
    seeds = [rng.randrange(2**32) for _ in kinds]
    warmup = args.warmup_requests if args.warmup_requests is not None else max(1, args.requests // 10)
    outcomes: list[Outcome] = []
    rss = {}
    lock = threading.Lock()
    start = time.perf_counter()

    def run(i):
        out = soak.run_one(i, kinds[i], random.Random(seeds[i]))
        with lock:
            outcomes.append(out)
        return out

    # the first `warmup` requests, then (the server idle again) its memory, then the rest: growth is
    # measured between two idle moments, so requests in flight do not count as growth
    with concurrent.futures.ThreadPoolExecutor(args.concurrency) as pool:
        list(pool.map(run, range(warmup)))
        soak.wait_idle()
        if args.server_pid:
            rss["after_warmup"] = rss_bytes(args.server_pid)
        list(pool.map(run, range(warmup, args.requests)))
    elapsed = time.perf_counter() - start
    info = soak.wait_idle()
    if args.server_pid:
        rss["end"] = rss_bytes(args.server_pid)

    by_status = collections.Counter(o.status for o in outcomes)
    failures = [o for o in outcomes if o.status == "failed"]
    texts: dict[tuple, set] = collections.defaultdict(set)
    for o in outcomes:
        if o.status == "ok" and o.key is not None:
            texts[o.key].add(o.text)
    mismatched = {k: v for k, v in texts.items() if len(v) > 1}
    answer_ids = [o.answer_id for o in outcomes if o.status == "ok"]
    duplicated = len(answer_ids) - len(set(answer_ids))
    compilations = soak.metric("jaxinfer_compilations_since_warmup")
    checks = {
        "every request has one outcome": len(outcomes) == args.requests,
        "no good request lost or broken": not failures,
        "no answer duplicated": duplicated == 0,
        "same request, same text": not mismatched,
        "server idle afterwards": info.active_slots == 0 and info.queue_depth == 0,
        "every KV page free or cached": info.kv_pages_used == 0,
        "zero compilations after warm-up": compilations == 0,
    }
    growth = None
    if rss:
        growth = rss["end"] / rss["after_warmup"] - 1
        checks[f"resident memory grew < {args.max_rss_growth:.0%} after warm-up"] = growth < args.max_rss_growth
    summary = {
        "requests": args.requests,
        "concurrency": args.concurrency,
        "seconds": elapsed,
        "requests_per_s": args.requests / elapsed,
        "by_kind": dict(collections.Counter(kinds)),
        "by_status": dict(by_status),
        "failures": [f"#{o.index} {o.kind}: {o.problem}" for o in failures[:20]],
        "mismatched_keys": [str(k) for k in list(mismatched)[:5]],
        "duplicated_answers": duplicated,
        "kv_pages_used": info.kv_pages_used,
        "compilations_since_warmup": compilations,
        "rss_after_warmup_bytes": rss.get("after_warmup"),
        "rss_end_bytes": rss.get("end"),
        "rss_growth": growth,
        "checks": checks,
    }
    print(
        f"soak: {args.requests} requests in {elapsed:.1f}s ({args.requests / elapsed:.1f}/s), "
        f"concurrency {args.concurrency}: " + ", ".join(f"{k} {v}" for k, v in sorted(by_status.items()))
    )
    if growth is not None:
        before, after = rss["after_warmup"] / 2**20, rss["end"] / 2**20
        print(f"soak: server RSS {before:.0f} MiB after warm-up, {after:.0f} MiB at the end ({growth:+.1%})")
    for problem in summary["failures"]:
        print(f"soak: FAILED {problem}")
    for name, ok in checks.items():
        print(f"soak: {'PASS' if ok else 'FAIL'} {name}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(summary, f, indent=1)
    return 0 if all(checks.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
