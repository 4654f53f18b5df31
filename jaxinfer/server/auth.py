"""API keys and TLS, the same for both protocols.

One key (`--api-key`, or the environment variable JAXINFER_API_KEY) guards the generation API: HTTP
wants `Authorization: Bearer <key>` on /v1/*, /tokenize and /detokenize, gRPC wants the call metadata
`authorization: Bearer <key>` on every `jaxinfer.v1.Generation` method. Health checks, reflection and
/metrics stay open (load balancers and scrapers carry no key), as in vLLM. Keys are compared in
constant time. `--tls-cert` and `--tls-key` (PEM files) turn on TLS for both listeners.
"""

from __future__ import annotations

import dataclasses
import hmac
import os

import grpc

API_KEY_ENV = "JAXINFER_API_KEY"


def api_key(flag: str | None) -> str | None:
    """The key in force: --api-key, else JAXINFER_API_KEY, else None (no authentication)."""
    key = flag if flag is not None else os.environ.get(API_KEY_ENV)
    if key is not None and not key.strip():
        where = "--api-key" if flag is not None else API_KEY_ENV
        raise ValueError(f"{where} is empty: give a key, or leave it unset to serve without one")
    return key


def bearer_matches(header: str | None, key: str) -> bool:
    """Whether an `Authorization` value is `Bearer <key>` (the scheme case-insensitive, as RFC 7235 has it)."""
    if not header:
        return False
    scheme, _, token = header.partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), key.encode())


@dataclasses.dataclass(frozen=True)
class TlsFiles:
    """A PEM certificate chain and its private key, read once at start-up."""

    cert_path: str
    key_path: str
    cert: bytes
    key: bytes

    def grpc_credentials(self) -> grpc.ServerCredentials:
        return grpc.ssl_server_credentials([(self.key, self.cert)])


def tls_files(cert: str | None, key: str | None) -> TlsFiles | None:
    """--tls-cert and --tls-key, both or neither, each a readable PEM file; None when TLS is off."""
    if (cert is None) != (key is None):
        given, missing = ("--tls-cert", "--tls-key") if cert is not None else ("--tls-key", "--tls-cert")
        raise ValueError(f"{given} needs {missing} too (TLS takes a certificate and its private key)")
    if cert is None:
        return None
    contents = {}
    for flag, path, marker in (("--tls-cert", cert, b"CERTIFICATE-----"), ("--tls-key", key, b"PRIVATE KEY-----")):
        if not os.path.isfile(path):
            raise ValueError(f"{flag} {path}: no such file")
        with open(path, "rb") as f:
            data = f.read()
        if b"-----BEGIN " not in data or marker not in data:
            raise ValueError(f"{flag} {path}: not a PEM file holding a {marker.decode().rstrip('-').lower()}")
        contents[flag] = data
    return TlsFiles(cert, key, contents["--tls-cert"], contents["--tls-key"])


class ApiKeyInterceptor(grpc.ServerInterceptor):
    """Refuses calls to `service`'s methods without `authorization: Bearer <key>` metadata (UNAUTHENTICATED);
    other services (health, reflection) pass."""

    def __init__(self, key: str, service: str, on_refused=None):
        self._key, self._prefix = key, f"/{service}/"
        self._on_refused = on_refused  # called with the method name of each refused call (metrics)

        def refuse(request, context):
            context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong API key: send 'authorization: Bearer KEY'")

        def refuse_stream(request, context):
            refuse(request, context)
            yield  # never reached: abort raises

        self._unary = grpc.unary_unary_rpc_method_handler(refuse)
        self._stream = grpc.unary_stream_rpc_method_handler(refuse_stream)

    def intercept_service(self, continuation, handler_call_details):
        method = handler_call_details.method
        if not method.startswith(self._prefix):
            return continuation(handler_call_details)
        metadata = dict(handler_call_details.invocation_metadata or ())
        if bearer_matches(metadata.get("authorization"), self._key):
            return continuation(handler_call_details)
        if self._on_refused is not None:
            self._on_refused(method.removeprefix(self._prefix))
        handler = continuation(handler_call_details)
        return self._stream if handler is not None and handler.response_streaming else self._unary
