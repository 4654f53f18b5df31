"""The gRPC server as operators run it: `python -m jaxinfer.serve` in a subprocess on a loopback port,
the real stories260K model, one server for the whole module. Greedy outputs are checked against the
batch job (`python -m jaxinfer.run`) run with the same flags. Tests run in file order; the metrics
test is last because it checks the counts the others left behind.
"""

import concurrent.futures
import json
import math
import re
import subprocess
import sys
import threading
import time
import urllib.request

import grpc
import pytest
from google.protobuf import descriptor_pool, json_format, message_factory
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase
from prometheus_client.parser import text_string_to_metric_families

from jaxinfer.proto import jaxinfer_pb2 as pb
from jaxinfer.proto import jaxinfer_pb2_grpc

MODEL = [
    "--model",
    "tests/data/stories260K/stories260K.bin",
    "--mesh",
    "1x1",
    "--max-context",
    "512",
    "--max-slots",
    "4",
    "--prefill-chunk",
    "32",
    "--min-bucket",  # steps of 8, 16 and 32 tokens: three shapes to compile instead of six
    "8",
]
OPENINGS = [
    "Once upon a time, there was a",
    "One day, a little",
    "The sun was shining and",
    "Lily saw a big",
    "Tom and his mom went to the",
    "There was a happy",
    "In the garden, a small",
    "The old tree had a",
]
NAMES = ["dog", "girl named Sue", "bird", "red ball", "park", "cat", "boy named Ben", "fish"]
PROMPTS = [f"{a} {b}" for a in OPENINGS for b in NAMES]  # 64 distinct prompts
SAMPLED = {i: dict(temperature=0.9, top_p=0.95, seed=1000 + i) for i in range(0, 64, 8)}  # seeded sampling
MAX_TOKENS = 24
SP = pb.SamplingParams


class ServerProcess:
    """`python -m jaxinfer.serve` on free loopback ports (it logs which), its log collected line by line."""

    def __init__(self, *flags):
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "jaxinfer.serve",
                *MODEL,
                "--host",
                "127.0.0.1",
                "--port",
                "0",
                "--metrics-port",
                "0",
                *flags,
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        self.lines: list[str] = []
        threading.Thread(target=lambda: self.lines.extend(self.proc.stdout), daemon=True).start()
        try:
            self.port = int(self.wait_for(r"gRPC listening on 127\.0\.0\.1:(\d+)").group(1))
            self.metrics_port = int(self.wait_for(r"metrics on http://127\.0\.0\.1:(\d+)/metrics").group(1))
        except BaseException:
            self.proc.kill()
            raise
        self.target = f"127.0.0.1:{self.port}"

    def wait_for(self, pattern: str, timeout: float = 300) -> re.Match:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            for line in list(self.lines):
                if m := re.search(pattern, line):
                    return m
            assert self.proc.poll() is None, "server exited:\n" + "".join(self.lines)
            time.sleep(0.05)
        raise AssertionError(f"{pattern!r} not logged:\n" + "".join(self.lines))

    def log(self) -> str:
        return "".join(self.lines)

    def metrics(self) -> dict:
        """{(name, frozenset(labels)): value} of every sample on the metrics endpoint."""
        text = urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=10).read().decode()
        return {
            (s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text)
            for s in family.samples
        }

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=60)


def wait_until(predicate, timeout=10.0, step=0.01):
    end = time.monotonic() + timeout
    while not (value := predicate()):
        assert time.monotonic() < end, "condition not reached in time"
        time.sleep(step)
    return value


@pytest.fixture(scope="module")
def batch_job(tmp_path_factory):
    """The batch job's results for PROMPTS (started first, so it compiles while the server does)."""
    tmp = tmp_path_factory.mktemp("batch")
    src, out = tmp / "in.jsonl", tmp / "out.jsonl"
    lines = [{"id": str(i), "prompt": p, "max_tokens": MAX_TOKENS, **SAMPLED.get(i, {})} for i, p in enumerate(PROMPTS)]
    src.write_text("".join(json.dumps(line) + "\n" for line in lines))
    proc = subprocess.Popen(
        [sys.executable, "-m", "jaxinfer.run", *MODEL, "--no-chat", "--input", str(src), "--output", str(out)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )

    def results():
        log, _ = proc.communicate(timeout=300)
        assert proc.returncode == 0, log
        return [json.loads(line) for line in out.read_text().splitlines()]

    return results


@pytest.fixture(scope="module")
def server(batch_job):
    # n-gram speculation in every slot that has proposals: outputs must still equal the batch job's (no speculation)
    srv = ServerProcess(
        "--max-queue", "64", "--stream-buffer", "16", "--speculative", "ngram", "--no-speculative-adaptive"
    )
    try:
        srv.wait_for(r"SERVING stories260K")
        yield srv
    finally:
        srv.stop()


@pytest.fixture(scope="module")
def reference(batch_job, server):
    return batch_job()


@pytest.fixture(scope="module")
def channel(server):
    with grpc.insecure_channel(server.target) as ch:
        yield ch


@pytest.fixture(scope="module")
def stub(channel):
    return jaxinfer_pb2_grpc.GenerationStub(channel)


def generate_request(i: int, with_id: bool) -> pb.GenerateRequest:
    return pb.GenerateRequest(
        request_id=f"req-{i}" if with_id else "",
        text=PROMPTS[i],
        params=SP(max_tokens=MAX_TOKENS, **SAMPLED.get(i, {})),
    )


def test_64_concurrent_streams_complete_and_match_the_batch_job(stub, reference):
    def stream(i):
        return list(stub.Generate(generate_request(i, with_id=i % 2 == 0), timeout=120))

    with concurrent.futures.ThreadPoolExecutor(64) as pool:
        streams = list(pool.map(stream, range(64)))
    ids = set()
    for i, responses in enumerate(streams):
        rid = responses[0].request_id
        assert rid and all(r.request_id == rid for r in responses), "responses of one stream carry one id"
        assert rid == f"req-{i}" if i % 2 == 0 else len(rid) == 32
        ids.add(rid)
        final = responses[-1]
        assert [r.HasField("usage") for r in responses] == [False] * (len(responses) - 1) + [True]
        token_ids = [t for r in responses for t in r.token_ids]
        assert len(token_ids) == final.usage.completion_tokens, "no token lost or duplicated"
        want = reference[i]
        assert token_ids == want["token_ids"], f"prompt {i}: {PROMPTS[i]!r}"
        assert "".join(r.text for r in responses) == want["text"]
        assert pb.FinishReason.Name(final.finish_reason) == "FINISH_REASON_" + want["finish_reason"].upper()
        assert final.usage.prompt_tokens == want["usage"]["prompt_tokens"]
        assert 0 < final.usage.time_to_first_token_s <= final.usage.total_time_s
    assert len(ids) == 64
    usages = [responses[-1].usage for responses in streams]
    assert sum(u.speculative_accepted for u in usages) > 0  # speculation ran, and changed no token
    assert all(0 <= u.speculative_accepted <= u.speculative_proposed for u in usages)
    unary = stub.GenerateUnary(generate_request(1, with_id=False))
    assert list(unary.token_ids) == reference[1]["token_ids"] and unary.text == reference[1]["text"]


def test_continuous_batching_short_requests_overtake_a_long_one(stub):
    """Short requests sent while a long one runs finish while it still has most of its tokens to go
    (counted in tokens, not seconds, so a fast machine does not make it pass or fail by luck)."""
    long_call = stub.Generate(pb.GenerateRequest(text="Once upon a time", params=SP(max_tokens=300, ignore_eos=True)))
    progress = []  # (time, tokens the long request has streamed so far)

    def consume():
        for response in long_call:
            progress.append((time.monotonic(), (progress[-1][1] if progress else 0) + len(response.token_ids)))

    consumer = threading.Thread(target=consume)
    consumer.start()
    wait_until(lambda: progress)  # the long request is running
    observed, done = [], threading.Event()

    def poll():
        while not done.is_set():
            observed.append(stub.GetModelInfo(pb.GetModelInfoRequest()).active_slots)
            time.sleep(0.002)

    poller = threading.Thread(target=poll)
    poller.start()

    def short(i):
        response = stub.GenerateUnary(pb.GenerateRequest(text=PROMPTS[i], params=SP(max_tokens=16, ignore_eos=True)))
        return response, time.monotonic()

    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        shorts = list(pool.map(short, range(6)))
    consumer.join()
    done.set()
    poller.join()
    assert progress[-1][1] == 300
    assert all(len(r.token_ids) == 16 for r, _ in shorts)
    shorts_done = max(t for _, t in shorts)
    long_by_then = max((n for t, n in progress if t <= shorts_done), default=0)
    # six shorts of 16 tokens on the 3 free slots take about 2 x 16 steps: the long one advances about as much
    assert long_by_then < 200, f"the long request had {long_by_then}/300 tokens when the short ones were done"
    assert max(observed) == 4, "concurrently active slots reach --max-slots"
    assert stub.GetModelInfo(pb.GetModelInfoRequest()).peak_active_slots == 4


def release_histogram(server):
    m = server.metrics()
    return {dict(labels)["le"]: v for (name, labels), v in m.items() if name == "jaxinfer_cancel_release_steps_bucket"}


def test_cancel_mid_stream_frees_the_slot_within_one_step(server, stub):
    before = release_histogram(server)
    call = stub.Generate(pb.GenerateRequest(text="Once upon a time", params=SP(max_tokens=300, ignore_eos=True)))
    for _ in range(5):
        next(call)
    assert stub.GetModelInfo(pb.GetModelInfoRequest()).active_slots == 1
    call.cancel()
    info = wait_until(lambda: (i := stub.GetModelInfo(pb.GetModelInfoRequest())).active_slots == 0 and i, timeout=2)
    assert info.kv_pages_used == 0
    after = wait_until(lambda: (h := release_histogram(server))["+Inf"] == before["+Inf"] + 1 and h)
    assert after["1.0"] == before["1.0"] + 1, "the slot was freed at most one engine step after the cancel arrived"
    assert len(stub.GenerateUnary(pb.GenerateRequest(text="Hi", params=SP(max_tokens=3))).token_ids) == 3


def test_deadline_exceeded_ends_the_request_and_frees_its_slot(stub):
    # 480 tokens are 480 engine steps: far more than 0.2 s on any CPU (a step costs the host ~1 ms)
    call = stub.Generate(
        pb.GenerateRequest(text="Once upon a time", params=SP(max_tokens=480, ignore_eos=True)), timeout=0.2
    )
    with pytest.raises(grpc.RpcError) as e:
        list(call)
    assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    wait_until(lambda: stub.GetModelInfo(pb.GetModelInfoRequest()).active_slots == 0, timeout=2)
    assert len(stub.GenerateUnary(pb.GenerateRequest(text="Hi", params=SP(max_tokens=3))).token_ids) == 3


def _varint(n: int) -> bytes:
    out = b""
    while True:
        out += bytes([(n & 0x7F) | (0x80 if n > 0x7F else 0)])
        n >>= 7
        if not n:
            return out


def field(number: int, payload: bytes) -> bytes:
    """A length-delimited protobuf field, written by hand so it can hold what the generated code refuses."""
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def gen(**kw) -> bytes:
    return pb.GenerateRequest(**kw).SerializeToString()


CHAT = field(1, b"user") + field(2, b"Hello")
INVALID = [  # (serialized GenerateRequest, what the INVALID_ARGUMENT message must contain)
    (gen(), "the prompt is empty"),
    (gen(text=""), "text is empty"),
    (gen(text="Hi", token_ids=[1, 2]), "only one of text, messages or token_ids"),
    (gen(text="Once upon a time " * 150), "text: the prompt is"),
    (gen(token_ids=[1] * 600), "token_ids: the prompt is 600 tokens, above the limit of 511"),
    (gen(token_ids=[1, 999]), "token_ids contains 999"),
    (gen(text="Hi", params=SP(max_tokens=513)), "params.max_tokens=513 exceeds the limit of 512"),
    (gen(text="Hi", params=SP(max_tokens=0)), "params.max_tokens=0"),
    (gen(text="Hi", params=SP(temperature=-0.5)), "params.temperature=-0.5"),
    (gen(text="Hi", params=SP(temperature=math.nan)), "params.temperature=nan"),
    (gen(text="Hi", params=SP(top_p=1.5)), "params.top_p=1.5"),
    (gen(text="Hi", params=SP(top_p=0)), "params.top_p=0.0"),
    (gen(text="Hi", params=SP(top_k=-1)), "params.top_k=-1"),
    (gen(text="Hi", params=SP(min_p=1)), "params.min_p=1.0"),
    (gen(text="Hi", params=SP(seed=-3)), "params.seed=-3"),
    (gen(text="Hi", params=SP(seed=2**32)), "params.seed=4294967296"),
    (gen(text="Hi", params=SP(stop=[""])), "params.stop"),
    (gen(text="Hi", params=SP(stop_token_ids=[600])), "params.stop_token_ids contains 600"),
    (gen(text="Hi", params=SP(presence_penalty=3)), "params.presence_penalty=3.0 must be a number in [-2, 2]"),
    (gen(text="Hi", params=SP(repetition_penalty=0)), "params.repetition_penalty=0.0 must be a number in (0, 10]"),
    (gen(text="Hi", params=SP(logit_bias={999: 1.0})), "params.logit_bias has token 999"),
    (gen(text="Hi", params=SP(top_logprobs=21)), "params.top_logprobs=21 must be an integer in [0, 20]"),
    (gen(text="Hi", params=SP(prompt_logprobs=-1)), "params.prompt_logprobs=-1"),
    (gen(messages=[pb.ChatMessage(role="user", content="Hi")]), "messages: this model has no chat template"),
    (field(3, CHAT + b"\x18\x01"), "messages[0] has unknown field number 3"),
    (field(3, CHAT) + field(3, field(1, b"user") + field(2, b"caf\xc3")), "messages[1].content is not valid UTF-8"),
    (field(2, b"Once \xc3\x28"), "text is not valid UTF-8"),
    (field(2, b"Hi") + field(5, field(7, b"\xe2\x82")), "params.stop[0] is not valid UTF-8"),
    (gen(text="Hi") + _varint(99 << 3) + b"\x01", "request has unknown field number 99"),
]


@pytest.fixture(scope="module")
def raw(channel):
    """Callables that send bytes as they are (no client-side serialization)."""
    return {m: channel.unary_unary(f"/jaxinfer.v1.Generation/{m}") for m in ("GenerateUnary", "Tokenize", "Detokenize")}


def test_sampled_request_without_seed_reports_one_that_reproduces_it(stub):
    params = dict(max_tokens=20, temperature=1.0, ignore_eos=True)
    first = [stub.GenerateUnary(pb.GenerateRequest(text="Once upon a time", params=SP(**params))) for _ in range(3)]
    seeds = [r.usage.seed for r in first]
    assert len(set(seeds)) == 3 and len({tuple(r.token_ids) for r in first}) > 1
    again = [
        stub.GenerateUnary(pb.GenerateRequest(text="Once upon a time", params=SP(**params, seed=s))) for s in seeds
    ]
    assert [list(r.token_ids) for r in again] == [list(r.token_ids) for r in first]
    assert [r.usage.seed for r in again] == seeds


def test_a_second_turn_reports_the_prompt_tokens_it_found_in_the_prefix_cache(stub, reference):
    text = "Once upon a time, there was a little girl named Lily. She loved to play outside in the sunshine."
    first = stub.GenerateUnary(pb.GenerateRequest(text=text, params=SP(max_tokens=24, ignore_eos=True)))
    prompt = list(stub.Tokenize(pb.TokenizeRequest(text=text)).token_ids)
    assert first.usage.prompt_tokens == len(prompt) and len(first.token_ids) == 24
    turn2 = prompt + list(first.token_ids) + prompt[1:6]
    second = stub.GenerateUnary(pb.GenerateRequest(token_ids=turn2, params=SP(max_tokens=4)))
    # whole pages (16 tokens) of what turn 1 computed (its prompt and 23 of its 24 tokens), short of
    # the page that holds turn 2's last prompt token
    page = 16
    assert second.usage.cached_tokens == page * min((len(prompt) + 23) // page, (len(turn2) - 1) // page) > 0
    assert second.usage.prompt_tokens == len(turn2)
    assert all(0 <= r["usage"]["cached_tokens"] < r["usage"]["prompt_tokens"] for r in reference)  # batch JSONL


@pytest.mark.parametrize("data,message", INVALID, ids=[m for _, m in INVALID])
def test_invalid_arguments_name_the_field(raw, channel, data, message):
    with pytest.raises(grpc.RpcError) as e:
        raw["GenerateUnary"](data, timeout=30)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and message in e.value.details(), e.value.details()
    with pytest.raises(grpc.RpcError) as e:  # the streaming RPC refuses it the same way
        list(channel.unary_stream("/jaxinfer.v1.Generation/Generate")(data, timeout=30))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and message in e.value.details()


def test_tokenize_detokenize_and_model_info(stub, raw):
    ids = stub.Tokenize(pb.TokenizeRequest(text=PROMPTS[0])).token_ids
    assert ids[0] == 1 and stub.Detokenize(pb.DetokenizeRequest(token_ids=ids)).text == PROMPTS[0]
    with pytest.raises(grpc.RpcError) as e:
        stub.Detokenize(pb.DetokenizeRequest(token_ids=[5, 9999]))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "token_ids" in e.value.details()
    with pytest.raises(grpc.RpcError) as e:
        raw["Tokenize"](field(1, b"\xff"))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "text is not valid UTF-8" in e.value.details()
    info = stub.GetModelInfo(pb.GetModelInfoRequest())
    assert (info.model_name, info.config.vocab_size, info.config.num_layers) == ("stories260K", 512, 5)
    assert info.platform == "cpu" and info.config.dtype == "float32"
    assert dict(info.mesh) == {"data": 1, "sequence": 1, "tensor": 1}
    assert (info.max_context, info.max_prompt_tokens, info.max_slots, info.max_queue) == (512, 511, 4, 64)
    assert list(info.bucket_sizes) == [8, 16, 32] and info.kv_pages_total == 4 * 512 // 16
    assert not info.has_chat_template and info.engine_steps > 0


def test_after_200_bad_requests_a_good_one_is_answered_correctly(raw, stub, reference):
    for n in range(200):
        data, message = INVALID[n % len(INVALID)]
        with pytest.raises(grpc.RpcError) as e:
            raw["GenerateUnary"](data, timeout=30)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and message in e.value.details()
    good = stub.GenerateUnary(generate_request(3, with_id=False))
    assert list(good.token_ids) == reference[3]["token_ids"] and good.text == reference[3]["text"]


def test_client_that_stops_reading_is_cut_off_without_slowing_others(server, stub):
    # A small HTTP/2 window makes the server's sends block soon after the client stops reading.
    options = [("grpc.http2.lookahead_bytes", 1024), ("grpc.http2.bdp_probe", 0)]
    with grpc.insecure_channel(server.target, options=options) as slow_channel:
        slow = jaxinfer_pb2_grpc.GenerationStub(slow_channel).Generate(
            pb.GenerateRequest(text="Once upon a time", params=SP(max_tokens=300, ignore_eos=True))
        )
        received = len(next(slow).token_ids)
        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            others = list(
                pool.map(
                    lambda i: stub.GenerateUnary(
                        pb.GenerateRequest(text=PROMPTS[i], params=SP(max_tokens=40, ignore_eos=True))
                    ),
                    range(4),
                )
            )
        assert all(len(r.token_ids) == 40 for r in others)
        assert all((r.usage.total_time_s - r.usage.time_to_first_token_s) / 39 < 0.25 for r in others)
        wait_until(lambda: stub.GetModelInfo(pb.GetModelInfoRequest()).active_slots == 0, timeout=10)
        with pytest.raises(grpc.RpcError) as e:
            for response in slow:
                received += len(response.token_ids)
    assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "did not read its stream" in e.value.details()
    assert received < 300


def test_client_built_only_from_reflection_calls_generate(server, reference):
    with grpc.insecure_channel(server.target) as ch:
        database = ProtoReflectionDescriptorDatabase(ch)
        assert {"jaxinfer.v1.Generation", "grpc.health.v1.Health"} <= set(database.get_services())
        pool = descriptor_pool.DescriptorPool(database)
        method = pool.FindServiceByName("jaxinfer.v1.Generation").methods_by_name["Generate"]
        request_type = message_factory.GetMessageClass(method.input_type)
        response_type = message_factory.GetMessageClass(method.output_type)
        assert request_type.DESCRIPTOR.file.pool is pool  # not the generated classes
        request = json_format.ParseDict({"text": PROMPTS[5], "params": {"max_tokens": MAX_TOKENS}}, request_type())
        call = ch.unary_stream(
            "/jaxinfer.v1.Generation/Generate",
            request_serializer=request_type.SerializeToString,
            response_deserializer=response_type.FromString,
        )
        responses = list(call(request, timeout=60))
    assert [t for r in responses for t in r.token_ids] == reference[5]["token_ids"]
    assert json_format.MessageToDict(responses[-1])["finishReason"].startswith("FINISH_REASON_")


def test_command_line_client(server, reference):
    def client(*args):
        return subprocess.run(
            [sys.executable, "-m", "jaxinfer.client", "--target", server.target, *args],
            capture_output=True,
            text=True,
            timeout=60,
        )

    text = client("--max-tokens", str(MAX_TOKENS), PROMPTS[2])
    assert text.returncode == 0 and text.stdout == reference[2]["text"]
    assert re.search(
        r"\[(stop|length): \d+ prompt \(\d+ cached\) \+ \d+ completion tokens, .*, seed \d+\]", text.stderr
    )
    streamed = client("--json", "--max-tokens", "5", "--logprobs", PROMPTS[2])
    lines = [json.loads(line) for line in streamed.stdout.splitlines()]
    assert [t for line in lines for t in line["token_ids"]] == reference[2]["token_ids"][:5]
    assert all(len(line["logprobs"]) == 1 for line in lines) and lines[-1]["usage"]["completion_tokens"] == 5
    bad = client("--top-p", "2", "Hi")
    assert bad.returncode == 1 and "INVALID_ARGUMENT: params.top_p=2.0 must be in (0, 1]" in bad.stderr


def test_metrics_endpoint_after_the_run(server, stub):
    wait_until(lambda: stub.GetModelInfo(pb.GetModelInfoRequest()).active_slots == 0)
    m = server.metrics()

    def value(name, **labels):
        return m[(name, frozenset(labels.items()))]

    assert value("jaxinfer_time_to_first_token_seconds_count") >= 64 + 6 + 4
    ttft = value("jaxinfer_time_to_first_token_seconds_sum") / value("jaxinfer_time_to_first_token_seconds_count")
    assert 0 < ttft < 30
    tpot = value("jaxinfer_time_per_output_token_seconds_sum") / value("jaxinfer_time_per_output_token_seconds_count")
    assert 1e-4 < tpot < 0.5
    assert value("jaxinfer_queue_depth") == 0 and value("jaxinfer_active_slots") == 0 and value("jaxinfer_slots") == 4
    # every page back: free, or kept by the prefix cache for later requests
    resident = value("jaxinfer_prefix_cache_resident_pages")
    assert value("jaxinfer_kv_pages_used") == 0 and value("jaxinfer_kv_pages_free") + resident == 128 and resident > 0
    hits, lookups = value("jaxinfer_prefix_cache_hit_tokens_total"), value("jaxinfer_prefix_cache_lookup_tokens_total")
    assert 0 <= hits <= lookups and lookups > 64 * 6
    assert value("jaxinfer_prefix_cache_hit_rate") == pytest.approx(hits / lookups)
    assert value("jaxinfer_prefix_cache_evictions_total") >= 0
    assert value("jaxinfer_startup_seconds", phase="ready") > value("jaxinfer_startup_seconds", phase="model_load") > 0
    assert (
        value("jaxinfer_startup_executables", origin="compiled")
        + value("jaxinfer_startup_executables", origin="loaded")
        == value("jaxinfer_startup_executables", origin="traced")
        + value("jaxinfer_startup_executables", origin="loaded")
        >= 3
    )  # at least the small buckets before SERVING
    assert value("jaxinfer_preemptions_total") == 0
    assert value("jaxinfer_compilations_since_warmup_total") == 0
    proposed = value("jaxinfer_speculative_proposed_tokens_total", proposer="ngram")
    accepted = value("jaxinfer_speculative_accepted_tokens_total", proposer="ngram")
    assert 0 < accepted < proposed and value("jaxinfer_speculative_windows_total", proposer="ngram") > 0
    assert value("jaxinfer_speculative_acceptance_rate", proposer="ngram") == pytest.approx(accepted / proposed)
    assert value("jaxinfer_engine_steps_total") > 300
    assert value("jaxinfer_generated_tokens_total") > 64 * 10 + 300
    assert value("jaxinfer_requests_finished_total", finish_reason="length") >= 70
    assert value("jaxinfer_requests_finished_total", finish_reason="cancelled") >= 3  # cancel, deadline, cut-off
    assert value("jaxinfer_rpc_requests_total", method="Generate", code="OK") >= 64
    assert value("jaxinfer_rpc_requests_total", method="GenerateUnary", code="INVALID_ARGUMENT") >= 200 + len(INVALID)
    assert value("jaxinfer_rpc_requests_total", method="Generate", code="RESOURCE_EXHAUSTED") == 1
    assert value("jaxinfer_rpc_requests_total", method="GetModelInfo", code="OK") > 10
