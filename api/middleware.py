"""Every request's context: its id (the caller's X-Request-ID when it sends a sane one, else a new one) bound for
the logs and the jobs it makes and echoed in the response, its latency by route for /metrics, and the security
headers every answer carries.

Plain ASGI rather than ``@app.middleware("http")``: Starlette's BaseHTTPMiddleware runs each request's app in
a task of its own and streams the response through a memory channel, a cost on every request (bench.admission)."""

from __future__ import annotations

import time
import uuid

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api import metrics
from pipeline import logs

# every answer: never sniffed into another type, never framed; a JSON answer runs nothing. (The page sets its own
# policy, api.routes.page; the OpenAPI pages load their scripts from a CDN, so they get only the frame rule.)
SECURITY_HEADERS = {b"x-content-type-options": b"nosniff", b"x-frame-options": b"DENY",
                    b"referrer-policy": b"no-referrer"}
API_CSP = b"default-src 'none'; frame-ancestors 'none'"
HTML_CSP = b"frame-ancestors 'none'"


def secured(headers: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    """``headers`` with the security headers a route did not set itself."""
    have = {k.lower(): v for k, v in headers}
    out = [*headers, *((k, v) for k, v in SECURITY_HEADERS.items() if k not in have)]
    if b"content-security-policy" not in have:
        html = have.get(b"content-type", b"").startswith(b"text/html")
        out.append((b"content-security-policy", HTML_CSP if html else API_CSP))
    return out


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
                msg["headers"] = [*secured(list(msg.get("headers", []))), (b"x-request-id", rid.encode())]
                observe(msg["status"])
            await send(msg)

        with logs.bound(request_id=rid):
            try:
                await self.app(scope, receive, with_id)
            finally:
                observe(500)  # no response started: the error middleware outside answers 500
