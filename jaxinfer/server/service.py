"""The Generation service, plus health and reflection: protobufs in, validated engine Requests to the
orchestrator, engine Events back out as protobufs. All of it runs on gRPC handler threads.

Requests are checked at the edge, before they take a place in the queue: the raw bytes by
`wire_problem` (unknown fields, invalid UTF-8), then the prompt and sampling parameters by the
request builder, once. Every rejection is INVALID_ARGUMENT with a message naming the field.
"""

from __future__ import annotations

import logging
import threading
import uuid
from concurrent import futures

import grpc
import numpy as np
from google.protobuf.message import DecodeError
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from jaxinfer.engine.requests import Request, RequestError
from jaxinfer.proto import jaxinfer_pb2 as pb
from jaxinfer.proto.sampling_fields import OPTIONAL_SAMPLING_FIELDS
from jaxinfer.request_builder import RequestBuilder
from jaxinfer.server.orchestrator import RequestFailed
from jaxinfer.server.wire import wire_problem
from jaxinfer.tokenizer import TokenizerError

log = logging.getLogger(__name__)

SERVICE = pb.DESCRIPTOR.services_by_name["Generation"].full_name
_FINISH = {
    "stop": pb.FINISH_REASON_STOP,
    "length": pb.FINISH_REASON_LENGTH,
    "cancelled": pb.FINISH_REASON_CANCELLED,
    "error": pb.FINISH_REASON_ERROR,
}
CUTOFF_GRACE_S = 5.0  # after a slow reader is cut off, how long its RPC waits for it before being cancelled
_NO_DEADLINE = 1e7  # context.time_remaining() of a call without a deadline is far beyond this


class _BadRequest:
    """What the request deserializer hands the handler instead of a message it refused."""

    def __init__(self, message: str):
        self.message = message


def _parser(message_type):
    def parse(data: bytes):
        problem = wire_problem(message_type.DESCRIPTOR, data)
        if problem:
            return _BadRequest(problem)
        try:
            return message_type.FromString(data)
        except DecodeError as e:
            return _BadRequest(f"request does not parse as {message_type.DESCRIPTOR.full_name}: {e}")

    return parse


class GenerationService:
    """The RPCs of `jaxinfer.v1.Generation`; UNAVAILABLE until `ready()` is called after warm-up."""

    def __init__(self, metrics):
        self.metrics = metrics
        self.engine = self.orchestrator = self.builder = None
        self._info: pb.ModelInfo | None = None

    def ready(self, engine, orchestrator) -> None:
        self.builder = RequestBuilder.for_engine(engine)
        self._info = _model_info(engine, orchestrator)
        self.engine, self.orchestrator = engine, orchestrator

    def handler(self) -> grpc.GenericRpcHandler:
        def unary(name, fn, request_type, response_type):
            return grpc.unary_unary_rpc_method_handler(
                self._unary(name, fn), _parser(request_type), response_type.SerializeToString
            )

        return grpc.method_handlers_generic_handler(
            SERVICE,
            {
                "Generate": grpc.unary_stream_rpc_method_handler(
                    self._streaming("Generate", self._generate),
                    _parser(pb.GenerateRequest),
                    pb.GenerateResponse.SerializeToString,
                ),
                "GenerateUnary": unary("GenerateUnary", self._generate_unary, pb.GenerateRequest, pb.GenerateResponse),
                "Tokenize": unary("Tokenize", self._tokenize, pb.TokenizeRequest, pb.TokenizeResponse),
                "Detokenize": unary("Detokenize", self._detokenize, pb.DetokenizeRequest, pb.DetokenizeResponse),
                "GetModelInfo": unary("GetModelInfo", self._model_info, pb.GetModelInfoRequest, pb.ModelInfo),
            },
        )

    # ---- status codes: every RPC ends in exactly one, counted by method ---------------------------
    def _checked(self, request):
        if self._info is None:
            raise RequestFailed(grpc.StatusCode.UNAVAILABLE, "the server is warming up; watch the health service")
        if isinstance(request, _BadRequest):
            raise RequestError(request.message)
        return request

    def _failure(self, method: str, error: Exception) -> tuple[grpc.StatusCode, str]:
        if isinstance(error, RequestFailed):
            code = error.code
        elif isinstance(error, (RequestError, TokenizerError)):
            code = grpc.StatusCode.INVALID_ARGUMENT
        else:
            log.exception("%s failed", method)
            return grpc.StatusCode.INTERNAL, f"internal error: {type(error).__name__}: {error}"
        return code, str(error)

    def _count(self, method: str, code: grpc.StatusCode) -> None:
        self.metrics.rpcs.labels(method, code.name).inc()

    def _unary(self, method, fn):
        def handle(request, context):
            try:
                response = fn(self._checked(request), context)
            except Exception as e:
                code, message = self._failure(method, e)
                self._count(method, code)
                context.abort(code, message)
            self._count(method, grpc.StatusCode.OK)
            return response

        return handle

    def _streaming(self, method, fn):
        def handle(request, context):
            try:
                yield from fn(self._checked(request), context)
            except GeneratorExit:  # the RPC ended under us: the client cancelled or its deadline passed
                self._count(method, grpc.StatusCode.CANCELLED)
                raise
            except Exception as e:
                code, message = self._failure(method, e)
                self._count(method, code)
                context.abort(code, message)
            self._count(method, grpc.StatusCode.OK)

        return handle

    # ---- the RPCs -------------------------------------------------------------------------------
    def _generate(self, msg: pb.GenerateRequest, context):
        ticket = self._submit(msg, context)
        for event in ticket:
            response = pb.GenerateResponse(
                request_id=ticket.request_id,
                token_ids=event.token_ids,
                text=event.text,
                logprobs=event.logprobs or (),
                top_logprobs=_top_logprobs(event.top_logprobs),
            )
            if event.result is not None:
                _finish(response, event.result)
            yield response

    def _generate_unary(self, msg: pb.GenerateRequest, context) -> pb.GenerateResponse:
        ticket = self._submit(msg, context)
        result = [event.result for event in ticket][-1]
        response = pb.GenerateResponse(
            request_id=ticket.request_id,
            token_ids=result.token_ids,
            text=result.text,
            logprobs=result.logprobs or (),
            top_logprobs=_top_logprobs(result.top_logprobs),
        )
        _finish(response, result)
        return response

    def _tokenize(self, msg: pb.TokenizeRequest, context) -> pb.TokenizeResponse:
        return pb.TokenizeResponse(token_ids=self.builder.encode(**_prompt_fields(msg))[1])

    def _detokenize(self, msg: pb.DetokenizeRequest, context) -> pb.DetokenizeResponse:
        try:
            return pb.DetokenizeResponse(text=self.engine.tokenizer.decode(list(msg.token_ids)))
        except TokenizerError as e:
            raise RequestError(f"token_ids: {e}") from None

    def _model_info(self, msg: pb.GetModelInfoRequest, context) -> pb.ModelInfo:
        info = pb.ModelInfo()
        info.CopyFrom(self._info)
        for key, value in self.orchestrator.status.items():
            setattr(info, key, value)
        return info

    # ---- requests -------------------------------------------------------------------------------
    def _submit(self, msg: pb.GenerateRequest, context):
        """Builds the request (validated once, by the request builder) and queues it; ties its life to the RPC's."""
        request = self._build(msg, msg.request_id or uuid.uuid4().hex, self._params(msg.params))
        remaining = context.time_remaining()
        ticket = self.orchestrator.submit(
            request, remaining if remaining < _NO_DEADLINE else None, on_cutoff=lambda: _cancel_later(context)
        )
        if not context.add_callback(lambda: self.orchestrator.cancel(ticket)):
            self.orchestrator.cancel(ticket)  # the RPC ended before the callback could be added
        return ticket

    def _build(self, msg, request_id: str, params: dict) -> Request:
        return self.builder.build(request_id, **_prompt_fields(msg), params=params, params_where="params.")

    def _params(self, p: pb.SamplingParams) -> dict:
        values = {name: getattr(p, name) for name in OPTIONAL_SAMPLING_FIELDS if p.HasField(name)}
        return dict(
            values,
            stop=tuple(p.stop),
            stop_token_ids=tuple(p.stop_token_ids),
            ignore_eos=p.ignore_eos,
            logprobs=p.logprobs,
            top_logprobs=p.top_logprobs,
            logit_bias=tuple(p.logit_bias.items()),
        )


def _prompt_fields(msg) -> dict:
    """The prompt fields a request message sets: text, messages or (GenerateRequest only) token_ids."""
    prompt = {}
    if msg.HasField("text"):
        prompt["text"] = msg.text
    if len(msg.messages):
        prompt["messages"] = [{"role": m.role, "content": m.content} for m in msg.messages]
    if "token_ids" in msg.DESCRIPTOR.fields_by_name and len(msg.token_ids):
        prompt["token_ids"] = list(msg.token_ids)
    return prompt


def _cancel_later(context) -> None:
    """A cut-off reader gets RESOURCE_EXHAUSTED when it reads again; one that never does is cancelled."""
    timer = threading.Timer(CUTOFF_GRACE_S, context.cancel)
    timer.daemon = True
    timer.start()


def _top_logprobs(per_token) -> list[pb.TopLogprobs]:
    """[[(token id, logprob), ...] per token] -> protobufs (empty when the request did not ask for them)."""
    return [
        pb.TopLogprobs(tokens=[pb.TokenLogprob(token_id=t, logprob=lp) for t, lp in top]) for top in per_token or ()
    ]


def _finish(response: pb.GenerateResponse, result) -> None:
    """Sets what only the last response carries: finish reason, usage and the prompt's logprobs."""
    if result.prompt_logprobs is not None:
        tops = result.prompt_top_logprobs or [[] for _ in result.prompt_logprobs]
        for logprob, top in zip(result.prompt_logprobs, _top_logprobs(tops)):
            entry = response.prompt_logprobs.add(top=top)
            if logprob is not None:
                entry.logprob = logprob
    response.finish_reason = _FINISH[result.finish_reason]
    response.usage.CopyFrom(
        pb.Usage(
            prompt_tokens=result.prompt_tokens,
            completion_tokens=result.completion_tokens,
            time_to_first_token_s=result.ttft_s or 0.0,
            total_time_s=result.total_s,
            preemptions=result.preemptions,
            seed=result.seed or 0,
            cached_tokens=result.cached_tokens,
            speculative_proposed=result.speculative_proposed,
            speculative_accepted=result.speculative_accepted,
        )
    )


def _model_info(engine, orchestrator) -> pb.ModelInfo:
    model, c, ec = engine.model, engine.model.config, engine.config
    return pb.ModelInfo(
        model_name=c.name,
        source=str(model.source),
        config=pb.ModelConfig(
            vocab_size=c.vocab_size,
            hidden_size=c.hidden_size,
            intermediate_size=c.intermediate_size,
            num_layers=c.num_layers,
            num_heads=c.num_heads,
            num_kv_heads=c.num_kv_heads,
            head_dim=c.head_dim,
            rope_theta=c.rope_theta,
            max_position_embeddings=c.max_position_embeddings,
            tie_embeddings=c.tie_embeddings,
            eos_token_ids=engine.tokenizer.eos_ids,
            dtype=str(np.dtype(model.dtype)),
        ),
        mesh=dict(model.mesh.shape),
        platform=engine.platform.name,
        max_context=ec.max_context,
        max_prompt_tokens=ec.max_prompt_tokens,
        max_slots=ec.max_slots,
        page_size=ec.page_size,
        kv_pages_total=engine.status().pages_total,
        bucket_sizes=engine.buckets,
        has_chat_template=engine.tokenizer.has_chat_template,
        max_queue=orchestrator.max_queue,
    )


def build_server(
    service: GenerationService,
    max_workers: int,
    address: str,
    credentials: grpc.ServerCredentials | None = None,
    interceptors: tuple = (),
) -> tuple[grpc.Server, int, health.HealthServicer]:
    """A gRPC server listening on `address` (-> its port) with the Generation service, health (NOT_SERVING
    until told otherwise) and reflection; not started. With `credentials` it speaks TLS only.

    `max_workers` handler threads, one per RPC in progress; beyond that gRPC itself answers RESOURCE_EXHAUSTED.
    A port in use is an error (gRPC would otherwise share it with the other process through SO_REUSEPORT).
    """
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers, thread_name_prefix="grpc"),
        maximum_concurrent_rpcs=max_workers,
        options=[("grpc.so_reuseport", 0)],
        interceptors=interceptors,
    )
    try:
        port = server.add_secure_port(address, credentials) if credentials else server.add_insecure_port(address)
    except RuntimeError:
        raise OSError(f"cannot listen on {address} (in use, or not an address of this machine)") from None
    server.add_generic_rpc_handlers((service.handler(),))
    health_servicer = health.HealthServicer()
    for name in ("", SERVICE):
        health_servicer.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection((SERVICE, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
    return server, port, health_servicer
