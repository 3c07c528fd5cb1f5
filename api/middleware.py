"""Every request's context: its id (the caller's X-Request-ID when it sends a sane one, else a new one) bound for
the logs and the jobs it makes and echoed in the response, and its latency by route for /metrics.

Plain ASGI rather than ``@app.middleware("http")``: Starlette's BaseHTTPMiddleware runs each request's app in
a task of its own and streams the response through a memory channel, a cost on every request (bench.admission)."""

from __future__ import annotations

import time
import uuid

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api import metrics
from pipeline import logs


def request_id(sent: str) -> str:
    return sent if 0 < len(sent) <= 64 and sent.replace("-", "").isalnum() else uuid.uuid4().hex


class RequestContext:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        sent = next((v for k, v in scope["headers"] if k == b"x-request-id"), b"")
        rid = request_id(sent.decode("latin-1"))
        t0, observed = time.perf_counter(), False

        def observe(status: int) -> None:
            nonlocal observed
            if not observed:  # once, when the response starts (a stream's length is not its latency)
                observed = True
                route = scope.get("route")
                metrics.observe(getattr(route, "path", "unmatched"), scope["method"], status, time.perf_counter() - t0)

        async def with_id(msg: Message) -> None:
            if msg["type"] == "http.response.start":
                msg["headers"] = [*msg.get("headers", []), (b"x-request-id", rid.encode())]
                observe(msg["status"])
            await send(msg)

        with logs.bound(request_id=rid):
            try:
                await self.app(scope, receive, with_id)
            finally:
                observe(500)  # no response started: the error middleware outside answers 500
