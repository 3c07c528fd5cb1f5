"""The request body cap: a body over ``max_bytes`` gets 413 in the API's error shape, whether or not it declares
its length. (The rate limit and the caps on jobs are admission's: pipeline.admission.)"""

from __future__ import annotations

import json

from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send


class BodyLimit:
    """Refuse a request body over ``max_bytes`` with 413, whether or not it declares its length.

    Our own rather than FastAPI's ``max_body_size`` (Starlette's RequestBodyLimitMiddleware): tried in its
    place, a body declaring a Content-Length over the cap got Starlette's plain-text 413 ("Content Too Large"),
    sent before any exception handler could give it the API's ``{"error": {"code", "message"}}`` shape."""

    def __init__(self, app: ASGIApp, max_bytes: int, upload_max_bytes: int | None = None) -> None:
        """``upload_max_bytes``: the cap for a multipart/form-data body (an image query's upload)."""
        self.app, self.max_bytes, self.upload_max_bytes = app, max_bytes, upload_max_bytes or max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        kind = headers.get(b"content-type", b"").split(b";", 1)[0].strip().lower()
        cap = self.upload_max_bytes if kind == b"multipart/form-data" else self.max_bytes
        declared = headers.get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > cap:
            return await self._refuse(send, cap)
        seen = 0
        started = False

        async def counted() -> Message:
            nonlocal seen
            msg = await receive()
            if msg["type"] == "http.request":
                seen += len(msg.get("body", b""))
                if seen > cap:
                    raise _TooLarge
            return msg

        async def tracked(msg: Message) -> None:
            nonlocal started
            started = started or msg["type"] == "http.response.start"
            await send(msg)

        try:
            await self.app(scope, counted, tracked)
        except _TooLarge:
            if not started:
                await self._refuse(send, cap)

    async def _refuse(self, send: Send, cap: int) -> None:
        body = json.dumps({"error": {"code": "payload_too_large",
                                     "message": f"the request body is over {cap} bytes"}}).encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})


class _TooLarge(HTTPException):
    def __init__(self) -> None:
        super().__init__(413, "the request body is too large")
