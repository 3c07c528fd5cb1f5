"""Every error leaves every edge (the API, the Cloud Function, the Modal endpoint) as
``{"error": {"code", "message"}}``, built by ``error_body`` alone, with the status its class carries
(pipeline.errors)."""

from __future__ import annotations

import logging
from typing import Any

import redis
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from pipeline.errors import ImgSearchError, InvalidRequest, RateLimited, Unavailable

log = logging.getLogger(__name__)

_HTTP_CODES = {400: "bad_request", 401: "unauthorized", 403: "forbidden", 404: "not_found",
               405: "method_not_allowed", 413: "payload_too_large", 429: "rate_limited"}
# Redis down under the API: a 503 the caller may retry at once
REDIS_DOWN = "the job store (Redis) is unreachable; retry shortly"


def error_body(code: str, message: str) -> dict[str, Any]:
    """The one error shape."""
    return {"error": {"code": code, "message": message}}


def headers_of(exc: ImgSearchError) -> dict[str, str] | None:
    """Retry-After on 429 and 503, the auth scheme on 401."""
    if exc.status == 401:
        return {"WWW-Authenticate": 'Bearer realm="imgsearch"'}
    if isinstance(exc, RateLimited):
        return {"Retry-After": str(exc.retry_after)}
    return {"Retry-After": "1"} if exc.status == 503 else None


def error_response(status: int, code: str, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(error_body(code, message), status_code=status, headers=headers)


def response_of(exc: ImgSearchError) -> JSONResponse:
    return error_response(exc.status, exc.code, exc.message, headers_of(exc))


def _describe(exc: RequestValidationError) -> str:
    parts = []
    for err in exc.errors()[:5]:
        loc = ".".join(str(p) for p in err.get("loc", ()) if p != "body") or "body"
        parts.append(f"{loc}: {err.get('msg', 'invalid')}")
    return "; ".join(parts) or "invalid request"


def install(app: FastAPI) -> None:
    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        return response_of(InvalidRequest(_describe(exc)))

    @app.exception_handler(ImgSearchError)
    async def _ours(_: Request, exc: ImgSearchError) -> JSONResponse:
        return response_of(exc)

    @app.exception_handler(redis.RedisError)
    async def _redis(_: Request, exc: redis.RedisError) -> JSONResponse:
        log.warning("redis unavailable: %s", type(exc).__name__)
        return response_of(Unavailable(REDIS_DOWN))

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        if exc.status_code == 400:  # a body FastAPI could not parse (not UTF-8, nested past the decoder's depth)
            return response_of(InvalidRequest(f"the body is not JSON text in UTF-8 ({exc.detail})"))
        return error_response(exc.status_code, _HTTP_CODES.get(exc.status_code, "http_error"), str(exc.detail),
                              dict(exc.headers or {}))

    @app.exception_handler(Exception)
    async def _any(_: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error")
        return response_of(ImgSearchError("an internal error occurred"))
