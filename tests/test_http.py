"""The OpenAI-compatible HTTP API as clients use it: `python -m jaxinfer.serve --http-port 0` in a
subprocess (stories260K, a tiny chat template from tests/data), one server for the module, driven by
the official `openai` package (sync, async, streaming) and by raw HTTP for what it would not send.
Greedy answers are checked against gRPC's GenerateUnary on the same server.
"""

import asyncio
import json
import socket
import time
import urllib.request

import grpc
import httpx2
import openai
import pytest
from test_server import SP, ServerProcess, wait_until

from jaxinfer.proto import jaxinfer_pb2 as pb
from jaxinfer.proto import jaxinfer_pb2_grpc

TEMPLATE = "tests/data/chat_template.jinja"
MODEL_NAME = "stories260K"
MAX_BODY = 65536


def http_flags(srv: ServerProcess) -> ServerProcess:
    srv.http_port = int(srv.wait_for(r"HTTP listening on https?://127\.0\.0\.1:(\d+)").group(1))
    return srv


@pytest.fixture(scope="module")
def server():
    srv = ServerProcess(
        "--http-port", "0", "--chat-template", TEMPLATE, "--max-queue", "64", "--max-body-bytes", str(MAX_BODY)
    )
    try:
        http_flags(srv).wait_for(r"SERVING stories260K")
        srv.url = f"http://127.0.0.1:{srv.http_port}"
        yield srv
    finally:
        srv.stop()


@pytest.fixture(scope="module")
def stub(server):
    with grpc.insecure_channel(server.target) as channel:
        yield jaxinfer_pb2_grpc.GenerationStub(channel)


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def http(server):
    with httpx2.Client(base_url=server.url, timeout=60) as c:
        yield c


def grpc_text(stub, max_tokens=16, **prompt) -> str:
    return stub.GenerateUnary(pb.GenerateRequest(**prompt, params=SP(max_tokens=max_tokens))).text


def test_openai_client_sync_async_and_streaming_match_grpc(client, http, server, stub):
    prompt, chat = "Once upon a time, there was a", [{"role": "user", "content": "Tell me a story"}]
    want_text = grpc_text(stub, text=prompt)
    want_chat = grpc_text(stub, messages=[pb.ChatMessage(role="user", content="Tell me a story")])
    assert want_text and want_chat

    done = client.completions.create(model=MODEL_NAME, prompt=prompt, max_tokens=16, temperature=0)
    assert done.object == "text_completion" and done.model == MODEL_NAME and done.id.startswith("cmpl-")
    assert done.choices[0].text == want_text and done.choices[0].finish_reason in ("stop", "length")
    u = done.usage
    assert (u.prompt_tokens, u.completion_tokens, u.total_tokens) == (
        len(http.post("/tokenize", json={"prompt": prompt}).json()["tokens"]),
        16,
        u.prompt_tokens + 16,
    )
    assert u.prompt_tokens_details.cached_tokens >= 0
    reply = client.chat.completions.create(model=MODEL_NAME, messages=chat, max_tokens=16, temperature=0)
    assert reply.object == "chat.completion" and reply.choices[0].message.role == "assistant"
    assert reply.choices[0].message.content == want_chat

    streamed = client.completions.create(prompt=prompt, model=MODEL_NAME, max_tokens=16, temperature=0, stream=True)
    assert "".join(c.choices[0].text for c in streamed) == want_text
    chunks = list(
        client.chat.completions.create(
            model=MODEL_NAME,
            messages=chat,
            max_tokens=16,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant" and chunks[-1].choices == []
    assert "".join(c.choices[0].delta.content or "" for c in chunks[:-1]) == want_chat
    assert chunks[-2].choices[0].finish_reason in ("stop", "length")
    assert chunks[-1].usage.completion_tokens == 16 and all(c.usage is None for c in chunks[:-1])

    async def run_async():
        async with openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0) as aclient:
            one = await aclient.completions.create(model=MODEL_NAME, prompt=prompt, max_tokens=16, temperature=0)
            stream = await aclient.chat.completions.create(
                model=MODEL_NAME, messages=chat, max_tokens=16, temperature=0, stream=True
            )
            return one.choices[0].text, "".join([c.choices[0].delta.content or "" async for c in stream])

    assert asyncio.run(run_async()) == (want_text, want_chat)


def test_64_concurrent_streaming_chats_each_equal_its_unary_answer(server):
    def messages(i):
        return [{"role": "system", "content": "Be kind."}, {"role": "user", "content": f"Story number {i} is"}]

    async def run():
        async with openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0, timeout=120) as c:
            params = lambda i: dict(model=MODEL_NAME, messages=messages(i), max_tokens=8, temperature=0.8, seed=i)

            async def stream(i):
                chunks = [chunk async for chunk in await c.chat.completions.create(**params(i), stream=True)]
                return "".join(ch.choices[0].delta.content or "" for ch in chunks), chunks[-1].choices[0].finish_reason

            streams = await asyncio.gather(*(stream(i) for i in range(64)))
            unary = await asyncio.gather(*(c.chat.completions.create(**params(i)) for i in range(64)))
            return streams, [(r.choices[0].message.content, r.choices[0].finish_reason) for r in unary]

    streams, unary = asyncio.run(run())
    assert streams == unary
    assert len({text for text, _ in streams}) > 32, "seeded sampling: the 64 answers differ"


def test_n_choices_and_prompt_lists(client, http):
    one = lambda seed: client.completions.create(
        model=MODEL_NAME, prompt="The dog", max_tokens=12, temperature=1.0, seed=seed
    )
    many = client.completions.create(model=MODEL_NAME, prompt="The dog", max_tokens=12, temperature=1.0, seed=7, n=3)
    assert [c.index for c in many.choices] == [0, 1, 2]
    assert [c.text for c in many.choices] == [one(s).choices[0].text for s in (7, 8, 9)], "choice i has seed + i"
    assert many.usage.completion_tokens == 36 and many.usage.prompt_tokens == one(7).usage.prompt_tokens
    ids = http.post("/tokenize", json={"prompt": "The cat"}).json()["tokens"]
    batch = client.completions.create(
        model=MODEL_NAME, prompt=[ids, ids[:2]], max_tokens=4, temperature=0, n=2, echo=True
    )
    assert len(batch.choices) == 4 and batch.choices[0].text == batch.choices[1].text
    assert batch.choices[0].text.startswith("The cat") and batch.choices[2].text.startswith("The")
    assert batch.usage.prompt_tokens == len(ids) + 2


def test_completion_logprobs_and_echo_shapes(client):
    r = client.completions.create(model=MODEL_NAME, prompt="Once upon", max_tokens=6, temperature=0, logprobs=2)
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 6
    assert "".join(lp.tokens) == r.choices[0].text and lp.text_offset[0] == 0
    assert all(x <= 0 for x in lp.token_logprobs)
    assert all(top[tok] == x for top, tok, x in zip(lp.top_logprobs, lp.tokens, lp.token_logprobs))
    echoed = client.completions.create(
        model=MODEL_NAME, prompt="Once upon", max_tokens=6, temperature=0, logprobs=2, echo=True
    )
    e = echoed.choices[0]
    assert e.text == "Once upon" + r.choices[0].text and e.logprobs.tokens[-6:] == lp.tokens
    assert e.logprobs.token_logprobs[0] is None and e.logprobs.top_logprobs[0] is None
    assert e.logprobs.text_offset[-6] == len("Once upon")
    chat = client.chat.completions.create(
        model=MODEL_NAME, messages=[{"role": "user", "content": "Hi"}], max_tokens=5, temperature=0, logprobs=True
    )
    content = chat.choices[0].logprobs.content
    assert len(content) == 5 and "".join(c.token for c in content) == chat.choices[0].message.content
    assert all(c.logprob <= 0 and bytes(c.bytes).decode() == c.token for c in content)


def test_top_logprobs_prompt_logprobs_and_logit_bias_over_http(client, http):
    chat = client.chat.completions.create(
        model=MODEL_NAME,
        messages=[{"role": "user", "content": "Hi"}],
        max_tokens=5,
        temperature=0,
        logprobs=True,
        top_logprobs=3,
    )
    for entry in chat.choices[0].logprobs.content:
        tops = [t.logprob for t in entry.top_logprobs]
        assert len(tops) == 3 and tops == sorted(tops, reverse=True)
        assert entry.top_logprobs[0].token == entry.token and entry.top_logprobs[0].logprob == pytest.approx(
            entry.logprob
        )
    echoed = client.completions.create(
        model=MODEL_NAME, prompt="Once upon a time", max_tokens=4, temperature=0, logprobs=3, echo=True
    )
    lp = echoed.choices[0].logprobs
    prompt_len = echoed.usage.prompt_tokens
    assert all(x is not None and x <= 0 for x in lp.token_logprobs[1:])
    assert all(3 <= len(top) <= 4 for top in lp.top_logprobs[1:]) and len(lp.tokens) == prompt_len + 4
    forced = client.completions.create(
        model=MODEL_NAME, prompt="Once upon a time", max_tokens=5, temperature=0, logit_bias={"300": 100}
    )
    # decoding from the start drops the SentencePiece space a continuation keeps
    assert forced.choices[0].text.lstrip() == http.post("/detokenize", json={"tokens": [300] * 5}).json()["prompt"]


def test_grpc_top_logprobs_prompt_logprobs_and_logit_bias(stub):
    params = SP(max_tokens=4, logprobs=True, top_logprobs=3, prompt_logprobs=2, logit_bias={300: 100.0})
    reply = stub.GenerateUnary(pb.GenerateRequest(text="Once upon a time", params=params))
    assert list(reply.token_ids) == [300] * 4 and len(reply.logprobs) == 4
    assert [len(top.tokens) for top in reply.top_logprobs] == [3] * 4
    # logprobs are the raw model's (before the bias), so the forced token need not lead its alternatives
    assert all(t.logprob <= 0 for top in reply.top_logprobs for t in top.tokens)
    assert len(reply.prompt_logprobs) == reply.usage.prompt_tokens
    assert not reply.prompt_logprobs[0].HasField("logprob") and all(
        p.HasField("logprob") and len(p.top.tokens) == 2 for p in reply.prompt_logprobs[1:]
    )
    streamed = list(stub.Generate(pb.GenerateRequest(text="Once upon a time", params=params)))
    assert [len(r.top_logprobs) for r in streamed] == [len(r.token_ids) for r in streamed]
    assert len(streamed[-1].prompt_logprobs) == reply.usage.prompt_tokens


def test_models_tokenize_detokenize_health_and_metrics(client, http, server):
    assert [m.id for m in client.models.list()] == [MODEL_NAME]
    card = http.get("/v1/models").json()["data"][0]
    assert card["max_model_len"] == 512 and card["owned_by"] == "jaxinfer" and card["vocab_size"] == 512
    tok = http.post("/tokenize", json={"prompt": "Once upon a time"}).json()
    assert tok["tokens"][0] == 1 and tok["count"] == len(tok["tokens"]) and tok["max_model_len"] == 512
    assert http.post("/tokenize", json={"prompt": "Once", "add_special_tokens": False}).json()["tokens"][0] != 1
    chat = http.post("/tokenize", json={"messages": [{"role": "user", "content": "Hi"}]}).json()["tokens"]
    assert http.post("/detokenize", json={"tokens": chat}).json()["prompt"] == "user: Hi\nassistant:"
    assert http.post("/detokenize", json={"tokens": tok["tokens"]}).json() == {"prompt": "Once upon a time"}
    assert http.get("/health").status_code == 200
    metrics = http.get("/metrics")
    assert metrics.status_code == 200 and "jaxinfer_http_requests_total" in metrics.text
    assert 'route="/v1/chat/completions",status="200"' in metrics.text


def _long(server, stream: bool) -> bytes:
    body = json.dumps(
        {"prompt": "Once upon a time", "max_tokens": 500, "ignore_eos": True, "temperature": 0, "stream": stream}
    )
    return (
        f"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1:{server.http_port}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n{body}"
    ).encode()


def cancelled(server) -> float:
    return server.metrics()[("jaxinfer_requests_finished_total", frozenset({("finish_reason", "cancelled")}))]


def release_buckets(server) -> dict:
    m = server.metrics()
    return {dict(labels)["le"]: v for (name, labels), v in m.items() if name == "jaxinfer_cancel_release_steps_bucket"}


@pytest.mark.parametrize("stream", [True, False], ids=["stream", "unary"])
def test_client_that_disconnects_frees_its_slot_within_a_step(server, stub, stream):
    before, buckets = cancelled(server), release_buckets(server)
    with socket.create_connection(("127.0.0.1", server.http_port), timeout=30) as s:
        s.sendall(_long(server, stream))
        received = b""
        while stream and b"data: " not in received:  # the first chunk arrived
            received += s.recv(4096)
        wait_until(lambda: stub.GetModelInfo(pb.GetModelInfoRequest()).active_slots == 1, timeout=10)
        time.sleep(0.05)
    info = wait_until(lambda: (i := stub.GetModelInfo(pb.GetModelInfoRequest())).active_slots == 0 and i, timeout=3)
    assert info.kv_pages_used == 0
    assert wait_until(lambda: cancelled(server) == before + 1, timeout=3)
    after = release_buckets(server)
    assert after["1.0"] == buckets["1.0"] + 1, "freed at most one engine step after the disconnect was seen"


BAD = [  # (path, body: dict or raw bytes, status, text the message must contain, param)
    ("/v1/completions", {}, 400, "prompt: required field missing", "prompt"),
    ("/v1/completions", {"prompt": ""}, 400, "prompt is empty", "prompt"),
    ("/v1/completions", {"prompt": []}, 400, "prompt: must be a string", "prompt"),
    ("/v1/completions", {"prompt": 5}, 400, "prompt: must be a string", "prompt"),
    ("/v1/completions", {"prompt": [1, "a"]}, 400, "prompt: must be a string", "prompt"),
    ("/v1/completions", {"prompt": [1, 2, 999]}, 400, "token_ids contains 999", "prompt"),
    ("/v1/completions", {"prompt": ["a"] * 65}, 400, "more than the limit of 64", "prompt"),
    ("/v1/completions", {"prompt": "Once upon a time " * 150}, 400, "prompt: the prompt is", "prompt"),
    ("/v1/completions", {"prompt": [[1] * 600]}, 400, "600 tokens, above the limit of 511", "prompt"),
    ("/v1/completions", {"prompt": "Hi", "max_tokens": 0}, 400, "max_tokens=0", "max_tokens"),
    ("/v1/completions", {"prompt": "Hi", "max_tokens": 513}, 400, "max_tokens=513 exceeds the limit", "max_tokens"),
    ("/v1/completions", {"prompt": "Hi", "max_tokens": "16"}, 400, "max_tokens: Input should be a valid integer", None),
    ("/v1/completions", {"prompt": "Hi", "max_tokens": 1.5}, 400, "max_tokens: Input should be a valid integer", None),
    ("/v1/completions", {"prompt": "Hi", "temperature": -1}, 400, "temperature=-1.0", "temperature"),
    (
        "/v1/completions",
        {"prompt": "Hi", "temperature": "hot"},
        400,
        "temperature: Input should be a valid number",
        None,
    ),
    ("/v1/completions", {"prompt": "Hi", "top_p": 1.5}, 400, "top_p=1.5", "top_p"),
    ("/v1/completions", {"prompt": "Hi", "top_p": 0}, 400, "top_p=0", "top_p"),
    ("/v1/completions", {"prompt": "Hi", "top_k": -1}, 400, "top_k=-1", "top_k"),
    ("/v1/completions", {"prompt": "Hi", "min_p": 1}, 400, "min_p=1", "min_p"),
    ("/v1/completions", {"prompt": "Hi", "seed": -3}, 400, "seed=-3", "seed"),
    ("/v1/completions", {"prompt": "Hi", "seed": 2**32}, 400, "seed=4294967296", "seed"),
    ("/v1/completions", {"prompt": "Hi", "stop": 5}, 400, "stop: must be a string or a list of strings", "stop"),
    ("/v1/completions", {"prompt": "Hi", "stop": [""]}, 400, "stop", "stop"),
    ("/v1/completions", {"prompt": "Hi", "stop_token_ids": [600]}, 400, "stop_token_ids contains 600", None),
    ("/v1/completions", {"prompt": "Hi", "presence_penalty": 3}, 400, "presence_penalty=3.0", "presence_penalty"),
    ("/v1/completions", {"prompt": "Hi", "frequency_penalty": -2.5}, 400, "frequency_penalty=-2.5", None),
    ("/v1/completions", {"prompt": "Hi", "repetition_penalty": 0}, 400, "repetition_penalty=0.0", None),
    ("/v1/completions", {"prompt": "Hi", "logit_bias": {"abc": 5}}, 400, "logit_bias has token 'abc'", "logit_bias"),
    ("/v1/completions", {"prompt": "Hi", "logit_bias": {"5": 101}}, 400, "logit_bias[5]=101.0", "logit_bias"),
    ("/v1/completions", {"prompt": "Hi", "logit_bias": {"999": 1}}, 400, "logit_bias has token 999", "logit_bias"),
    ("/v1/completions", {"prompt": "Hi", "n": 9}, 400, "n: Input should be less than or equal to 8", "n"),
    ("/v1/completions", {"prompt": "Hi", "n": 0}, 400, "n: Input should be greater than or equal to 1", "n"),
    ("/v1/completions", {"prompt": "Hi", "logprobs": 21}, 400, "logprobs: Input should be less than or equal", None),
    ("/v1/completions", {"prompt": "Hi", "echo": "yes"}, 400, "echo: Input should be a valid boolean", "echo"),
    ("/v1/completions", {"prompt": "Hi", "ignore_eos": 1}, 400, "ignore_eos: Input should be a valid boolean", None),
    ("/v1/completions", {"prompt": "Hi", "best_of": 3}, 400, "best_of is not supported", "best_of"),
    ("/v1/completions", {"prompt": "Hi", "suffix": "end"}, 400, "suffix is not supported", "suffix"),
    ("/v1/completions", {"prompt": "Hi", "max_token": 5}, 400, "max_token: unknown field", "max_token"),
    ("/v1/completions", {"prompt": "Hi", "stream": True, "echo": True, "logprobs": 1}, 400, "echo with logprobs", None),
    ("/v1/completions", {"prompt": "Hi", "model": "gpt-4"}, 404, "model 'gpt-4' does not exist", "model"),
    ("/v1/completions", {"prompt": "Hi", "stream_options": {"include_usage": 1}}, 400, "include_usage", None),
    ("/v1/completions", {"prompt": ["Hi"] * 9, "n": 8, "max_tokens": 400}, 429, "--max-queue", None),
    ("/v1/chat/completions", {}, 400, "messages: required field missing", "messages"),
    ("/v1/chat/completions", {"messages": []}, 400, "messages: List should have at least 1 item", "messages"),
    ("/v1/chat/completions", {"messages": [{"content": "Hi"}]}, 400, "messages[0].role: required field", None),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": 5}]}, 400, "messages[0].content", None),
    (
        "/v1/chat/completions",
        {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
        400,
        "only text",
        None,
    ),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi", "x": 1}]}, 400, "messages[0].x", None),
    ("/v1/chat/completions", {"messages": "Hi"}, 400, "messages: Input should be a valid list", "messages"),
    (
        "/v1/chat/completions",
        {"messages": [{"role": "user", "content": "Hi"}], "top_logprobs": 21, "logprobs": True},
        400,
        "top_logprobs: Input should be less than or equal to 20",
        "top_logprobs",
    ),
    (
        "/v1/chat/completions",
        {"messages": [{"role": "user", "content": "Hi"}], "top_logprobs": 2},
        400,
        "top_logprobs needs logprobs",
        "top_logprobs",
    ),
    (
        "/v1/chat/completions",
        {"messages": [{"role": "user", "content": "Hi"}], "response_format": {"type": "json_object"}},
        400,
        "response_format type 'json_object' is not supported",
        "response_format",
    ),
    (
        "/v1/chat/completions",
        {"messages": [{"role": "user", "content": "Hi"}], "response_format": {"type": "json_schema"}},
        400,
        "response_format type 'json_schema' is not supported",
        "response_format",
    ),
    (
        "/v1/chat/completions",
        {"messages": [{"role": "user", "content": "Hi"}], "tools": [{"type": "function"}]},
        400,
        "tools is not supported",
        "tools",
    ),
    (
        "/v1/chat/completions",
        {"messages": [{"role": "user", "content": "Hi"}], "max_completion_tokens": 0},
        400,
        "max_tokens=0",
        "max_tokens",
    ),
    (
        "/v1/chat/completions",
        {"messages": [{"role": "user", "content": "Hi"}], "logprobs": 1},
        400,
        "logprobs: Input should be a valid boolean",
        "logprobs",
    ),
    ("/v1/completions", b"{not json", 400, "not valid JSON", None),
    ("/v1/completions", b"[1, 2]", 400, "must be a JSON object", None),
    ("/v1/completions", b"\xff\xfe", 400, "not valid JSON", None),
    ("/v1/completions", b'{"prompt": "' + b"a" * MAX_BODY + b'"}', 413, "above the limit of 65536", None),
    ("/tokenize", {}, 400, "set prompt or messages", "prompt"),
    ("/tokenize", {"prompt": "a", "messages": [{"role": "user", "content": "b"}]}, 400, "only one of", "messages"),
    ("/detokenize", {"tokens": [5, 9999]}, 400, "tokens:", "tokens"),
    ("/detokenize", {"tokens": "5"}, 400, "tokens: Input should be a valid list", "tokens"),
    ("/v1/nothing", {}, 404, "POST /v1/nothing: Not Found", None),
]


@pytest.mark.parametrize("path,body,status,message,param", BAD, ids=[f"{b[2]}-{b[3][:40]}" for b in BAD])
def test_bad_requests_get_the_right_status_and_name_the_field(http, path, body, status, message, param):
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    r = http.post(path, content=content, headers={"Content-Type": "application/json"})
    error = r.json()["error"]
    assert r.status_code == status and message in error["message"], (r.status_code, error)
    assert error["code"] == status and error["type"]
    if param is not None:
        assert error["param"] == param


def test_streamed_oversized_body_and_wrong_method(http, server):
    chunks = (b"x" * 8192 for _ in range(MAX_BODY // 8192 + 2))  # no Content-Length: chunked
    r = http.post("/v1/completions", content=chunks)
    assert r.status_code == 413 and "over the limit of 65536" in r.json()["error"]["message"]
    r = http.get("/v1/completions")
    assert r.status_code == 405 and r.json()["error"]["code"] == 405


def test_after_the_bad_requests_a_good_one_is_answered_correctly(client, stub, server):
    want = grpc_text(stub, text="Lily saw a big")
    assert (
        client.completions.create(model=MODEL_NAME, prompt="Lily saw a big", max_tokens=16, temperature=0)
        .choices[0]
        .text
        == want
    )
    wait_until(lambda: stub.GetModelInfo(pb.GetModelInfoRequest()).active_slots == 0, timeout=10)
    text = urllib.request.urlopen(server.url + "/metrics", timeout=10).read().decode()
    assert 'route="/v1/completions",status="400"' in text and 'route="/v1/completions",status="429"' in text


def test_the_readme_curl_example_streams_sse(server):
    """The README's `curl -N ... "stream": true` command, run as written against this server's port."""
    import pathlib
    import re
    import shlex
    import shutil
    import subprocess

    if shutil.which("curl") is None:
        pytest.skip("curl is not installed")
    readme = (pathlib.Path(__file__).resolve().parents[1] / "README.md").read_text()
    command = re.search(r"^curl -N .*?\n(?:    .*\n)*", readme, re.M).group(0).replace("\\\n", " ")
    argv = [a.replace("127.0.0.1:8000", f"127.0.0.1:{server.http_port}") for a in shlex.split(command)]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    events = [line[6:] for line in proc.stdout.splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]" and len(events) >= 3
    chunks = [json.loads(e) for e in events[:-1]]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"]).strip()
    assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")
