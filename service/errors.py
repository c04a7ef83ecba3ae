"""Every failure becomes an OpenAI error object with the right status, never a traceback."""

from __future__ import annotations

import json
import logging
import math

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from service.backend import (
    BackendError,
    GenerationError,
    InvalidRequest,
    Overloaded,
    RequestTimeout,
    Unavailable,
    UpstreamFailed,
    UpstreamRejected,
)
from service.protocol import ErrorBody, ErrorResponse, UnsupportedField

log = logging.getLogger(__name__)

_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
    500: "server_error",
    502: "server_error",
    503: "service_unavailable",
    504: "timeout",
}


class APIError(Exception):
    """An error the HTTP layer reports as-is."""

    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.headers = headers or {}

    def body(self) -> ErrorResponse:
        kind = _TYPES.get(self.status, "invalid_request_error" if self.status < 500 else "server_error")
        return ErrorResponse(error=ErrorBody(message=self.message, type=kind, param=self.param, code=self.code))

    def response(self) -> JSONResponse:
        return JSONResponse(self.body().model_dump(), status_code=self.status, headers=self.headers)


def model_not_found(name: str, known: list[str]) -> APIError:
    return APIError(404, f"model {name!r} not found; available: {', '.join(known)}", "model", "model_not_found")


def from_exception(err: Exception, retry_after_s: float = 1.0) -> APIError:
    """Map engine and validation exceptions to their HTTP error."""
    if isinstance(err, APIError):
        return err
    if isinstance(err, UnsupportedField):
        return APIError(400, str(err), err.param, "unsupported_value")
    if isinstance(err, InvalidRequest):
        return APIError(400, str(err), err.param, "invalid_value")
    if isinstance(err, Overloaded):
        seconds = str(max(1, math.ceil(err.retry_after or retry_after_s)))
        return APIError(429, str(err) or "server overloaded", None, "overloaded", {"Retry-After": seconds})
    if isinstance(err, RequestTimeout):
        return APIError(504, str(err) or "request timed out", None, "timeout")
    if isinstance(err, Unavailable):
        return APIError(503, str(err) or "backend unavailable", None, "engine_unavailable")
    if isinstance(err, GenerationError):
        return APIError(500, str(err), None, "generation_failed")
    if isinstance(err, UpstreamRejected):
        return APIError(err.status, str(err), err.param, err.code or "upstream_rejected")
    if isinstance(err, UpstreamFailed):
        return APIError(502, str(err), None, "upstream_failed")
    if isinstance(err, BackendError):
        return APIError(500, f"engine error: {err}", None, "engine_error")
    log.exception("unhandled error", exc_info=err)
    return APIError(500, "internal server error", None, "internal_error")


def _validation_error(exc: RequestValidationError) -> APIError:
    errors = exc.errors()
    if any(e.get("type") == "json_invalid" for e in errors):
        return APIError(422, "request body is not valid JSON", None, "malformed_json")
    first = errors[0] if errors else {}
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    param = ".".join(loc) or None
    message = first.get("msg", "invalid request")
    if first.get("type") == "missing" and param:
        message = f"missing required field {param!r}"
    elif param:
        message = f"{param}: {message}"
    if len(errors) > 1:
        message += f" (and {len(errors) - 1} more problem(s))"
    return APIError(400, message, param, "invalid_value")


def install_handlers(app: FastAPI, retry_after_s: float = 1.0) -> None:
    @app.exception_handler(APIError)
    async def _api_error(_: Request, exc: APIError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        return _validation_error(exc).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        return APIError(exc.status_code, str(exc.detail), headers=dict(exc.headers or {})).response()

    # Expected errors get handlers of their own: Starlette re-raises whatever reaches the catch-all
    # `Exception` handler after answering, which logs a traceback and drops the connection.
    @app.exception_handler(BackendError)
    @app.exception_handler(UnsupportedField)
    async def _expected(_: Request, exc: Exception) -> JSONResponse:
        return from_exception(exc, retry_after_s).response()

    @app.exception_handler(Exception)
    async def _any(_: Request, exc: Exception) -> JSONResponse:
        return from_exception(exc, retry_after_s).response()


def error_event(err: APIError) -> str:
    """The SSE event a failing stream sends before `data: [DONE]`."""
    payload = err.body().model_dump()
    payload["error"]["status"] = err.status
    return f"data: {json.dumps(payload)}\n\n"
