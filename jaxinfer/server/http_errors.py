"""HTTP errors in OpenAI's shape, {"error": {"message", "type", "param", "code"}}, `code` being the HTTP
status (as vLLM sends it), and the one mapping from what a request can raise to its status: a field
problem 400 (`param` naming the field), a full queue 429, warming up or draining 503, a deadline 504.
"""

from __future__ import annotations

import logging
import re

import grpc
from fastapi.responses import JSONResponse

from jaxinfer.engine.requests import RequestError
from jaxinfer.server.openai_protocol import ProtocolError
from jaxinfer.server.orchestrator import RequestFailed
from jaxinfer.tokenizer import TokenizerError

log = logging.getLogger(__name__)

_STATUS = {
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
    grpc.StatusCode.INVALID_ARGUMENT: 400,
}
_TYPE = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    500: "server_error",
    503: "service_unavailable",
    504: "timeout_error",
}
_FIELD = re.compile(r"^(?:prompt\[\d+\]: )?([a-z_]+)")  # the field a RequestError message starts with


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None):
        super().__init__(message)
        self.status, self.param = status, param


def error_body(status: int, message: str, param: str | None = None) -> dict:
    return {"error": {"message": message, "type": _TYPE.get(status, "error"), "param": param, "code": status}}


def error_response(status: int, message: str, param: str | None = None, headers=None) -> JSONResponse:
    return JSONResponse(error_body(status, message, param), status_code=status, headers=headers)


def failure(error: Exception) -> ApiError:
    """The HTTP error for what a request raised on its way through the builder and the orchestrator."""
    if isinstance(error, ApiError):
        return error
    if isinstance(error, ProtocolError):
        return ApiError(400, str(error), error.param)
    if isinstance(error, (RequestError, TokenizerError)):
        match = _FIELD.match(str(error))
        param = match.group(1) if match else None
        return ApiError(400, str(error), "prompt" if param == "token_ids" else param)
    if isinstance(error, RequestFailed):
        return ApiError(_STATUS.get(error.code, 500), str(error))
    log.error("HTTP request failed", exc_info=error)
    return ApiError(500, f"internal error: {type(error).__name__}: {error}")
