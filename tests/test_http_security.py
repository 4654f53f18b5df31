"""API key and TLS on both protocols, one server for the module (`--api-key`, `--tls-cert/--tls-key` with
a self-signed certificate made here by `openssl`), then SIGTERM: /health 503 while in-flight requests
drain. Tests run in file order; the last one ends the server. Flag mistakes are checked without a model.
"""

import concurrent.futures
import signal
import ssl
import subprocess
import sys

import grpc
import httpx2
import openai
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from test_http import MODEL_NAME, TEMPLATE, http_flags
from test_server import SP, ServerProcess, wait_until

from jaxinfer.proto import jaxinfer_pb2 as pb
from jaxinfer.proto import jaxinfer_pb2_grpc
from tests.cli_inprocess import run_front_end

KEY = "s3cret-key"
AUTH = [("authorization", f"Bearer {KEY}")]


@pytest.fixture(scope="module")
def cert(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("tls")
    subprocess.run(
        [
            "openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
            "-keyout", str(tmp / "key.pem"), "-out", str(tmp / "cert.pem"), "-days", "1", "-subj", "/CN=localhost",
            "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1",
        ],
        check=True,
        capture_output=True,
    )  # fmt: skip
    return tmp / "cert.pem", tmp / "key.pem"


@pytest.fixture(scope="module")
def server(cert):
    srv = ServerProcess(
        "--http-port", "0", "--chat-template", TEMPLATE, "--api-key", KEY,
        "--tls-cert", str(cert[0]), "--tls-key", str(cert[1]),
    )  # fmt: skip
    try:
        http_flags(srv).wait_for(r"SERVING stories260K")
        assert "(TLS, API key;" in srv.log()
        srv.url = f"https://127.0.0.1:{srv.http_port}"
        yield srv
    finally:
        srv.stop()


@pytest.fixture(scope="module")
def trusted(cert):
    return ssl.create_default_context(cafile=str(cert[0]))


@pytest.fixture(scope="module")
def https(server, trusted):
    with httpx2.Client(base_url=server.url, verify=trusted, timeout=60) as c:
        yield c


@pytest.fixture(scope="module")
def channel(server, cert):
    credentials = grpc.ssl_channel_credentials(root_certificates=cert[0].read_bytes())
    with grpc.secure_channel(server.target, credentials) as ch:
        yield ch


def test_https_needs_the_key_and_a_trusted_certificate(server, https, trusted):
    def client(key):
        return openai.OpenAI(
            base_url=server.url + "/v1", api_key=key, max_retries=0, http_client=httpx2.Client(verify=trusted)
        )

    done = client(KEY).completions.create(model=MODEL_NAME, prompt="Once upon a time", max_tokens=8, temperature=0)
    assert done.usage.completion_tokens == 8
    with pytest.raises(openai.AuthenticationError) as e:
        client("wrong").chat.completions.create(model=MODEL_NAME, messages=[{"role": "user", "content": "Hi"}])
    assert e.value.status_code == 401 and "API key" in e.value.body["message"]
    for method, path in (
        ("GET", "/v1/models"),
        ("POST", "/v1/completions"),
        ("POST", "/tokenize"),
        ("POST", "/detokenize"),
    ):
        r = https.request(method, path, json={})
        assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer", (path, r.text)
        assert r.json()["error"]["type"] == "authentication_error"
    r = https.post("/tokenize", json={"prompt": "Hi"}, headers={"Authorization": f"bearer {KEY}"})
    assert r.status_code == 200 and r.json()["tokens"][0] == 1
    assert https.get("/health").status_code == 200 and https.get("/metrics").status_code == 200  # open, as in vLLM
    with pytest.raises(httpx2.HTTPError):  # plaintext to the TLS port
        httpx2.get(f"http://127.0.0.1:{server.http_port}/health", timeout=10)
    with pytest.raises(httpx2.ConnectError):  # a client that does not trust the self-signed certificate
        httpx2.get(server.url + "/health", timeout=10)


def test_grpc_needs_the_key_and_tls(server, channel, https, cert):
    stub = jaxinfer_pb2_grpc.GenerationStub(channel)
    request = pb.GenerateRequest(text="Once upon a time", params=SP(max_tokens=8))
    reply = stub.GenerateUnary(request, metadata=AUTH, timeout=30)
    over_http = https.post(
        "/v1/completions",
        json={"prompt": "Once upon a time", "max_tokens": 8, "temperature": 0},
        headers={"Authorization": f"Bearer {KEY}"},
    )
    assert reply.text == over_http.json()["choices"][0]["text"] and len(reply.token_ids) == 8
    for metadata in (None, [("authorization", "Bearer wrong")], [("authorization", KEY)]):
        with pytest.raises(grpc.RpcError) as e:
            stub.GenerateUnary(request, metadata=metadata, timeout=30)
        assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED and "API key" in e.value.details()
        with pytest.raises(grpc.RpcError) as e:
            list(stub.Generate(request, metadata=metadata, timeout=30))
        assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
    health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""), timeout=10)
    assert health.status == health_pb2.HealthCheckResponse.SERVING  # health checks carry no key
    with grpc.insecure_channel(server.target) as plain:
        with pytest.raises(grpc.RpcError) as e:
            jaxinfer_pb2_grpc.GenerationStub(plain).GenerateUnary(request, metadata=AUTH, timeout=10)
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE
    cli = [sys.executable, "-m", "jaxinfer.client", "--target", server.target, "--tls-ca", str(cert[0])]
    ok = subprocess.run(
        [*cli, "--api-key", KEY, "--max-tokens", "8", "Once upon a time"], capture_output=True, text=True
    )
    assert ok.returncode == 0 and ok.stdout == reply.text, ok.stderr
    refused = subprocess.run([*cli, "--api-key", "wrong", "Hi"], capture_output=True, text=True)
    assert refused.returncode == 1 and "UNAUTHENTICATED" in refused.stderr
    m = server.metrics()
    refusals = {
        method: m[("jaxinfer_rpc_requests_total", frozenset({("method", method), ("code", "UNAUTHENTICATED")}))]
        for method in ("GenerateUnary", "Generate")
    }
    assert refusals == {"GenerateUnary": 3, "Generate": 4}


def test_sigterm_health_503_while_in_flight_requests_drain(server, https):
    headers = {"Authorization": f"Bearer {KEY}"}
    body = {"prompt": "Hi", "max_tokens": 200, "ignore_eos": True, "temperature": 0, "n": 8, "stream": True}

    def stream():
        with https.stream("POST", "/v1/completions", json=body, headers=headers) as r:
            return [line for line in r.iter_lines() if line.startswith("data: ")]

    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        lines = pool.submit(stream)
        wait_until(lambda: "jaxinfer_active_slots 4.0" in https.get("/metrics").text, timeout=10)
        server.proc.send_signal(signal.SIGTERM)
        r = wait_until(lambda: (r := https.get("/health")).status_code == 503 and r, timeout=3)
        assert "shutting down" in r.json()["error"]["message"]
        refused = https.post("/v1/completions", json={"prompt": "Hi"}, headers=headers)
        assert refused.status_code == 503 and refused.json()["error"]["type"] == "service_unavailable"
        lines = lines.result(timeout=60)
    assert lines[-1] == "data: [DONE]" and sum('"finish_reason":"length"' in line for line in lines) == 8
    assert server.proc.wait(timeout=30) == 0 and "SIGTERM: draining" in server.log()


WRONG_FLAGS = [
    (["--tls-cert", "README.md"], "--tls-cert needs --tls-key too"),
    (["--tls-cert", "README.md", "--tls-key", "README.md"], "--tls-cert README.md: not a PEM file"),
    (["--tls-cert", "nope.pem", "--tls-key", "README.md"], "--tls-cert nope.pem: no such file"),
    (["--http-port", "70000"], "--http-port 70000 must be in [0, 65535]"),
    (["--max-body-bytes", "0"], "--max-body-bytes 0 must be >= 1"),
    (["--chat-template", "nope.jinja"], "--chat-template nope.jinja: no such file"),
    (["--api-key", " "], "--api-key is empty"),
]


@pytest.mark.parametrize("flags,message", WRONG_FLAGS)
def test_wrong_flags_are_one_line_and_exit_2(flags, message, capfd):
    # the first case as a real process, the others in this one (tests/cli_inprocess.py)
    code, _, stderr = run_front_end("jaxinfer.serve", flags, capfd, in_process=flags != WRONG_FLAGS[0][0], timeout=60)
    lines = stderr.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith(f"jaxinfer.serve: error: {message}"), lines
