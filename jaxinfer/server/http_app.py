"""The OpenAI-compatible HTTP API (FastAPI on uvicorn's event loop), over the same orchestrator as gRPC.

    GET  /v1/models · POST /v1/completions · POST /v1/chat/completions (SSE with "stream": true)
    POST /tokenize · POST /detokenize · GET /health (503 while warming up or draining) · GET /metrics

A request is checked at the door like a gRPC one (body size, JSON, pydantic types in
`openai_protocol`, then the engine's limits in `RequestBuilder`); `n` choices are n engine requests
with one prompt (the prefix cache shares its prefill). The handlers never block the event loop: they
read their tickets with `Ticket.poll`, woken from the engine thread through `loop.call_soon_threadsafe`.
A client that goes away (a closed stream, or a unary request whose connection drops) cancels its
engine requests at once, through `Orchestrator.cancel`. Errors have OpenAI's shape,
{"error": {"message", "type", "param", "code"}}, `code` being the HTTP status (as in vLLM).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time

from fastapi import FastAPI, Request
from fastapi.responses import Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException

from jaxinfer.request_builder import RequestBuilder
from jaxinfer.server import openai_protocol as proto
from jaxinfer.server.auth import bearer_matches
from jaxinfer.server.http_errors import ApiError, error_response, failure
from jaxinfer.server.openai_completions import Completions
from jaxinfer.tokenizer import TokenizerError

log = logging.getLogger(__name__)

_ROUTES = ("/v1/models", "/v1/completions", "/v1/chat/completions", "/tokenize", "/detokenize", "/health", "/metrics")


class OpenAIServer:
    """The HTTP front end: 503 (health included) until `ready()` after warm-up, and again once `draining`."""

    def __init__(self, metrics, api_key: str | None = None, max_body_bytes: int = 4 << 20):
        self.metrics, self.api_key, self.max_body_bytes = metrics, api_key, max_body_bytes
        self.engine = self.orchestrator = self.builder = self.completions = None
        self.model_name = None
        self.draining = False
        self.created = int(time.time())

    def ready(self, engine, orchestrator) -> None:
        self.builder = RequestBuilder.for_engine(engine)
        self.model_name = engine.model.config.name
        self.completions = Completions(engine, orchestrator, self.builder, self.model_name)
        self.engine, self.orchestrator = engine, orchestrator

    # ---- the door: serving state, key, body, model ------------------------------------------------
    def _serving_error(self) -> ApiError | None:
        if self.draining:
            return ApiError(503, "the server is shutting down")
        if self.engine is None:
            return ApiError(503, "the server is warming up; poll /health until it answers 200")
        return None

    def _authorize(self, request: Request) -> None:
        if self.api_key is not None and not bearer_matches(request.headers.get("authorization"), self.api_key):
            raise ApiError(401, "missing or wrong API key: send the header 'Authorization: Bearer KEY'")

    async def _body(self, request: Request, model: type) -> object:
        """The JSON body as `model`: 413 past --max-body-bytes (declared or streamed), 400 when not JSON."""
        self._authorize(request)
        if (problem := self._serving_error()) is not None:
            raise problem
        limit = self.max_body_bytes
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            raise ApiError(413, f"the request body is {declared} bytes, above the limit of {limit} (--max-body-bytes)")
        body = bytearray()
        async for part in request.stream():
            body += part
            if len(body) > limit:
                raise ApiError(413, f"the request body is over the limit of {limit} bytes (--max-body-bytes)")
        try:
            data = json.loads(body)
        except (ValueError, UnicodeDecodeError) as e:
            raise ApiError(400, f"the request body is not valid JSON: {e}") from None
        if not isinstance(data, dict):
            raise ApiError(400, f"the request body must be a JSON object, not {type(data).__name__}")
        try:
            parsed = proto.parse(model, data)
        except proto.ProtocolError as e:
            raise failure(e) from None
        if getattr(parsed, "model", None) not in (None, self.model_name):
            raise ApiError(
                404, f"model {parsed.model!r} does not exist; this server serves {self.model_name!r}", "model"
            )
        return parsed

    # ---- the app ----------------------------------------------------------------------------------
    def app(self) -> FastAPI:
        app = FastAPI(title="jaxinfer", docs_url=None, redoc_url=None, openapi_url=None)

        @app.exception_handler(ApiError)
        async def api_error(request: Request, e: ApiError):
            headers = {"WWW-Authenticate": "Bearer"} if e.status == 401 else None
            return error_response(e.status, str(e), e.param, headers)

        @app.exception_handler(HTTPException)
        async def http_error(request: Request, e: HTTPException):
            message = f"{request.method} {request.url.path}: {e.detail}"
            return error_response(e.status_code, message, headers=getattr(e, "headers", None))

        @app.get("/health")
        async def health():
            problem = self._serving_error()
            return Response(status_code=200) if problem is None else error_response(503, str(problem))

        @app.get("/metrics")
        async def metrics():
            return Response(generate_latest(self.metrics.registry), media_type=CONTENT_TYPE_LATEST)

        @app.get("/v1/models")
        async def models(request: Request):
            self._authorize(request)
            if (problem := self._serving_error()) is not None:
                raise problem
            card = {
                "id": self.model_name,
                "object": "model",
                "created": self.created,
                "owned_by": "jaxinfer",
                "root": str(self.engine.model.source),
                "max_model_len": self.engine.config.max_context,
                "vocab_size": self.engine.model.config.vocab_size,  # scripts/benchmark_serving.py draws prompts from it
            }
            return {"object": "list", "data": [card]}

        @app.post("/v1/completions")
        async def completions(request: Request):
            body = await self._body(request, proto.CompletionRequest)
            return await self._run(request, self.completions.completion(body))

        @app.post("/v1/chat/completions")
        async def chat_completions(request: Request):
            body = await self._body(request, proto.ChatCompletionRequest)
            return await self._run(request, self.completions.chat(body))

        @app.post("/tokenize")
        async def tokenize(request: Request):
            body = await self._body(request, proto.TokenizeRequest)
            try:
                if body.messages is not None and body.prompt is not None:
                    raise proto.ProtocolError("set only one of prompt or messages", "messages")
                if body.messages is not None:
                    conversation = [{"role": m.role, "content": m.text()} for m in body.messages]
                    ids = self.engine.tokenizer.encode_chat(conversation, body.add_generation_prompt)
                elif body.prompt is not None:
                    ids = self.engine.tokenizer.encode(body.prompt, add_bos=body.add_special_tokens)
                else:
                    raise proto.ProtocolError("set prompt or messages", "prompt")
            except Exception as e:
                raise failure(e) from None
            return {"count": len(ids), "max_model_len": self.engine.config.max_context, "tokens": ids}

        @app.post("/detokenize")
        async def detokenize(request: Request):
            body = await self._body(request, proto.DetokenizeRequest)
            try:
                return {"prompt": self.engine.tokenizer.decode(body.tokens)}
            except TokenizerError as e:
                raise ApiError(400, f"tokens: {e}", "tokens") from None

        return _CountStatus(app, self.metrics)

    async def _run(self, request: Request, job):
        """Runs a completions job: a stream as SSE, else its one body, given up (engine requests
        cancelled) if the client disconnects first."""
        try:
            stream = await job.start()
        except Exception as e:
            raise failure(e) from None
        if stream is not None:
            return _JobStream(job, stream)
        body = asyncio.ensure_future(job.collect())
        gone = asyncio.ensure_future(_disconnected(request))
        try:
            await asyncio.wait((body, gone), return_when=asyncio.FIRST_COMPLETED)
        finally:
            gone.cancel()
            if not body.done():  # the client went away: nobody will read the answer
                body.cancel()
                job.cancel()
        if body.cancelled():
            return Response(status_code=499)
        if (error := body.exception()) is not None:
            raise failure(error)
        return body.result()


class _JobStream(StreamingResponse):
    """Server-sent events of a job; however the response ends (done, client gone before or during the
    stream, an error), the job's engine requests still running are cancelled."""

    def __init__(self, job, stream):
        super().__init__(stream, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        self.job = job

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.job.cancel()


async def _disconnected(request: Request) -> None:
    """Returns when the client closes the connection (the request body was read already)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


class _CountStatus:
    """ASGI wrapper counting responses by route and status in `jaxinfer_http_requests` (receive untouched,
    so a disconnect still reaches the handler)."""

    def __init__(self, app, metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        route = scope["path"] if scope["path"] in _ROUTES else "other"

        async def counted(message):
            if message["type"] == "http.response.start":
                self.metrics.http_requests.labels(route, str(message["status"])).inc()
            await send(message)

        await self.app(scope, receive, counted)
