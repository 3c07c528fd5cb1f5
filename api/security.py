"""Who is calling and how much they may: API keys (kept as SHA-256 hashes), a token bucket per caller in
Redis, a cap on each caller's jobs in flight, a request body cap, and the client's address taken from
X-Forwarded-For only when the request came through a trusted proxy.

Keys are random 32-byte tokens, so a plain SHA-256 is enough to keep them unrecoverable from the settings
(a slow password hash guards guessable secrets; these are not guessable). With no key configured the API
is open, as for local use, and the admin routes are closed."""

from __future__ import annotations

import hashlib
import ipaddress
import logging
import secrets
import time
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from pipeline.errors import Forbidden, ImgSearchError
from pipeline.settings import Settings

log = logging.getLogger(__name__)

PREFIX = "imgsearch:limits"


class Unauthorized(ImgSearchError):
    code = "unauthorized"


class RateLimited(ImgSearchError):
    code = "rate_limited"

    def __init__(self, message: str, retry_after: float, code: str | None = None) -> None:
        super().__init__(message, code=code)
        self.retry_after = max(1, int(retry_after + 0.999))


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def new_key() -> str:
    return "isk_" + secrets.token_urlsafe(32)


@dataclass(frozen=True)
class Caller:
    id: str  # what limits count against: "key:<name>" or "ip:<address>"
    key_name: str | None = None
    admin: bool = False


def _networks(specs: list[str]) -> list[ipaddress.IPv4Network | ipaddress.IPv6Network]:
    return [ipaddress.ip_network(s, strict=False) for s in specs]


class Guard:
    """Authentication and limits for one app; Redis failures open the gate (and /readyz says so)."""

    def __init__(self, settings: Settings, limits: aioredis.Redis) -> None:
        self.s = settings
        self.keys = {k.sha256.lower(): k for k in settings.api_keys}
        self.trusted = _networks(settings.trusted_proxies)
        self.r = limits
        self._bucket = self.r.register_script(_BUCKET)
        self.down_since: float | None = None

    @property
    def open(self) -> bool:
        return not self.keys

    def _trusted(self, addr: str) -> bool:
        try:
            ip = ipaddress.ip_address(addr)
        except ValueError:
            return False
        return any(ip in net for net in self.trusted)

    def client_ip(self, request: Request) -> str:
        """The peer's address; behind a trusted proxy, the right-most address of X-Forwarded-For that is not
        itself a trusted proxy (what a client writes to the left of it is not believed)."""
        peer = request.client.host if request.client else "unknown"
        if not self._trusted(peer):
            return peer
        chain = [a.strip() for a in request.headers.get("x-forwarded-for", "").split(",") if a.strip()]
        for addr in reversed(chain):
            if not self._trusted(addr):
                return addr
        return chain[0] if chain else peer

    def caller(self, request: Request) -> Caller:
        ip = self.client_ip(request)
        if self.open:
            return Caller(f"ip:{ip}")
        auth = request.headers.get("authorization", "")
        token = auth[7:].strip() if auth.lower().startswith("bearer ") else request.headers.get("x-api-key", "")
        if not token:
            raise Unauthorized("an API key is required: 'Authorization: Bearer <key>' or 'X-API-Key: <key>'")
        key = self.keys.get(hash_key(token))
        if key is None:
            raise Unauthorized("the API key is not valid")
        return Caller(f"key:{key.name}", key.name, key.admin)

    def admin(self, caller: Caller) -> None:
        if not caller.admin:
            raise Forbidden("this route needs an admin API key" if not self.open else
                            "admin routes are closed while no API keys are configured (IMGSEARCH_API_KEYS)")

    async def _call(self, coro: Any, default: Any) -> Any:
        try:
            out = await coro
            self.down_since = None
            return out
        except Exception as exc:  # noqa: BLE001 - any Redis trouble: serve on without limits
            if self.down_since is None:
                log.warning("rate-limit store unavailable (%s): serving without limits", type(exc).__name__)
                self.down_since = time.time()
            return default

    async def limit(self, caller: Caller, cost: float = 1.0) -> None:
        """Take ``cost`` tokens from the caller's bucket (``rate_limit_per_min``, bursts of ``rate_limit_burst``)."""
        if self.s.rate_limit_per_min <= 0:
            return
        got = await self._call(self._bucket(keys=[f"{PREFIX}:bucket:{caller.id}"],
                                            args=[self.s.rate_limit_burst, self.s.rate_limit_per_min / 60.0, cost]),
                               None)
        if got is not None and int(got[0]) == 0:
            raise RateLimited(f"rate limit: {self.s.rate_limit_per_min} requests a minute (bursts of "
                              f"{self.s.rate_limit_burst}); retry later", float(got[1]))

    async def admit_job(self, caller: Caller, deadline_at: float) -> str | None:
        """Room for one more job in flight for this caller, or RateLimited; returns the set to record it in."""
        cap = self.s.max_jobs_in_flight
        if cap <= 0:
            return None
        key = f"{PREFIX}:inflight:{caller.id}"
        now = time.time()

        async def count() -> int:
            pipe = self.r.pipeline(transaction=True)
            pipe.zremrangebyscore(key, "-inf", now)  # jobs past their deadline no longer count
            pipe.zcard(key)
            return int((await pipe.execute())[1])

        n = await self._call(count(), 0)
        if n >= cap:
            raise RateLimited(f"{n} of your jobs are still queued or running (the cap is {cap}); wait for them",
                              1.0, code="too_many_jobs")
        return key

    async def record_job(self, key: str | None, job_id: str, deadline_at: float) -> None:
        if key is not None:
            await self._call(self._record(key, job_id, deadline_at), None)

    async def _record(self, key: str, job_id: str, deadline_at: float) -> None:
        pipe = self.r.pipeline(transaction=False)
        pipe.zadd(key, {job_id: deadline_at})
        pipe.expireat(key, int(deadline_at) + 60)
        await pipe.execute()

    async def state(self) -> str:
        try:
            await self.r.ping()
            return "ok"
        except Exception as exc:  # noqa: BLE001
            return f"down ({type(exc).__name__})"


# A token bucket: capacity ARGV[1] tokens, refilled at ARGV[2] a second; takes ARGV[3]. Returns {allowed,
# seconds until enough tokens}. Redis's own clock, so every API instance shares one.
_BUCKET = """
local cap, rate, cost = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1e6
local b = redis.call('HMGET', KEYS[1], 'tokens', 'ts')
local tokens, ts = tonumber(b[1]) or cap, tonumber(b[2]) or now
tokens = math.min(cap, tokens + math.max(0, now - ts) * rate)
local allowed, wait = 0, (cost - tokens) / rate
if tokens >= cost then tokens = tokens - cost; allowed = 1; wait = 0 end
redis.call('HSET', KEYS[1], 'tokens', tostring(tokens), 'ts', tostring(now))
redis.call('EXPIRE', KEYS[1], math.ceil(cap / rate) + 1)
return {allowed, tostring(wait)}
"""


def inflight_key(caller_id: str) -> str:
    return f"{PREFIX}:inflight:{caller_id}"


class BodyLimit:
    """Refuse a request body over ``max_bytes`` with 413, whether or not it declares its length."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            return await self._refuse(send)
        seen = 0
        started = False

        async def counted() -> Message:
            nonlocal seen
            msg = await receive()
            if msg["type"] == "http.request":
                seen += len(msg.get("body", b""))
                if seen > self.max_bytes:
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
                await self._refuse(send)

    async def _refuse(self, send: Send) -> None:
        import json

        body = json.dumps({"error": {"code": "payload_too_large",
                                     "message": f"the request body is over {self.max_bytes} bytes"}}).encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})


class _TooLarge(HTTPException):
    def __init__(self) -> None:
        super().__init__(413, "the request body is too large")
