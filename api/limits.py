"""The request body cap: a body over ``max_bytes`` gets 413 in the API's error shape, whether or not it declares
its length; and the places for event streams on this process. (The rate limit and the caps on jobs and on each
caller's streams are admission's: pipeline.admission.)"""

from __future__ import annotations

import json
import time

from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api.errors import error_body


class BodyLimit:
    """Refuse a request body over ``max_bytes`` with 413, whether or not it declares its length.

    Our own rather than FastAPI's ``max_body_size`` (Starlette's RequestBodyLimitMiddleware): tried in its
    place, a body declaring a Content-Length over the cap got Starlette's plain-text 413 ("Content Too Large"),
    sent before any exception handler could give it the API's ``{"error": {"code", "message"}}`` shape."""

    def __init__(self, app: ASGIApp, max_bytes: int, upload_max_bytes: int | None = None,
                 upload_routes: frozenset[tuple[str, str]] = frozenset()) -> None:
        """``upload_max_bytes``: the cap for a multipart/form-data body sent to one of ``upload_routes`` (method,
        path): an image query's upload. Any other route keeps ``max_bytes``, whatever its body says it is."""
        self.app, self.max_bytes, self.upload_max_bytes = app, max_bytes, upload_max_bytes or max_bytes
        self.upload_routes = upload_routes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        kind = headers.get(b"content-type", b"").split(b";", 1)[0].strip().lower()
        upload = kind == b"multipart/form-data" and (scope.get("method", ""), scope.get("path", "")) in self.upload_routes
        cap = self.upload_max_bytes if upload else self.max_bytes
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
        body = json.dumps(error_body("payload_too_large", f"the request body is over {cap} bytes")).encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})


class _TooLarge(HTTPException):
    def __init__(self) -> None:
        super().__init__(413, "the request body is too large")


class Slots:
    """Places for long requests on one API process (event streams), each held until given back or for
    ``lifetime`` seconds at most: a place whose stream never said goodbye lapses instead of leaking."""

    def __init__(self, size: int, lifetime: float) -> None:
        self.size, self.lifetime = size, lifetime
        self._held: dict[object, float] = {}

    def take(self) -> object | None:
        """A place, or None while all of them are held."""
        now = time.monotonic()
        for slot in [s for s, until in self._held.items() if until < now]:
            del self._held[slot]
        if len(self._held) >= self.size:
            return None
        slot = object()
        self._held[slot] = now + self.lifetime
        return slot

    def give(self, slot: object) -> None:
        self._held.pop(slot, None)

    def __len__(self) -> int:
        return len(self._held)
