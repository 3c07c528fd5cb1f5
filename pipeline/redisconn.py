"""Every Redis client of the product is made here, from one URL.

``redis://``, ``rediss://`` and ``unix://`` name one server, as redis-py reads them. A Sentinel group is named by
``sentinel://[[user]:password@]h1:26379;h2:26379;h3:26379/<master name>[/<db>]`` (``,`` separates hosts too):
the clients ask the Sentinels for the current primary, connect to it, and ask again after a failover (a
connection refused, or a write answered READONLY by a demoted primary, drops the pool's connections and the
next command re-discovers). The password in the URL is the data nodes' (as in ``redis://``); the Sentinels'
own password is a separate setting (``redis_sentinel_password``), passed here and never logged. While no
primary is known a command raises ``MasterNotFoundError``, a ``redis.ConnectionError``: the API answers it 503
with Retry-After, as it does Redis being away.

The queue (kombu's Sentinel transport) reads the same URL through ``kombu_url`` and ``kombu_options``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote

import redis
import redis.asyncio as aioredis
from redis.asyncio import sentinel as asentinel
from redis.backoff import NoBackoff
from redis.exceptions import ReadOnlyError
from redis.retry import Retry
from redis.sentinel import Sentinel, SentinelConnectionPool

SCHEME = "sentinel://"
_PASSWORD = re.compile(r"(://[^:/@;]*:)[^@/]*@")
DEFAULT_SENTINEL_PORT = 26379


@dataclass(frozen=True)
class SentinelTarget:
    """A parsed ``sentinel://`` URL."""

    hosts: tuple[tuple[str, int], ...]
    master: str
    db: int = 0
    username: str | None = None
    password: str | None = None  # the data nodes' (primary and replicas), not the Sentinels'


def is_sentinel(url: str) -> bool:
    return url.lower().startswith(SCHEME)


def _host(part: str) -> tuple[str, int]:
    part = part.strip()
    if part.startswith("["):  # [::1]:26379
        host, _, rest = part[1:].partition("]")
        return host, int(rest.lstrip(":") or DEFAULT_SENTINEL_PORT)
    host, _, port = part.rpartition(":") if ":" in part else (part, "", "")
    return host, int(port or DEFAULT_SENTINEL_PORT)


def parse_sentinel(url: str) -> SentinelTarget:
    """The Sentinels, the master's name and the database of a ``sentinel://`` URL; ValueError naming what is
    wrong (never the password) for anything else."""
    if not is_sentinel(url):
        raise ValueError("not a sentinel:// URL")
    rest = url[len(SCHEME):].split("?", 1)[0]
    netloc, _, path = rest.partition("/")
    username = password = None
    if "@" in netloc:
        auth, _, netloc = netloc.rpartition("@")
        user, _, pw = auth.partition(":")
        username, password = unquote(user) or None, unquote(pw) or None
    try:
        hosts = tuple(_host(p) for p in netloc.replace(",", ";").split(";") if p.strip())
    except ValueError:
        raise ValueError("sentinel:// URL: each Sentinel as host:port") from None
    parts = [p for p in path.split("/") if p]
    if not hosts or not parts or len(parts) > 2 or any(not h for h, _ in hosts):
        raise ValueError("sentinel:// URL: want sentinel://host:port;host:port/<master name>/<db>")
    if len(parts) == 2 and not parts[1].isdigit():
        raise ValueError("sentinel:// URL: the database is a number")
    return SentinelTarget(hosts, unquote(parts[0]), int(parts[1]) if len(parts) == 2 else 0, username, password)


def redacted(url: str) -> str:
    """The URL with any password replaced, fit for a log line."""
    return _PASSWORD.sub(r"\1***@", url)


# A managed Redis fails over behind one DNS name: a pooled connection still open to the demoted primary answers
# every write READONLY, and redis-py keeps such a connection. These drop it and raise ConnectionError instead
# (Redis away: 503, and every retry policy here tries again), so the next command resolves the name afresh and
# reaches the new primary, as the Sentinel-managed connections do.
_DEMOTED = "the primary was demoted to a replica (READONLY); reconnecting"


class _Demotable:
    def read_response(self, *args: Any, **kw: Any) -> Any:
        try:
            return super().read_response(*args, **kw)  # type: ignore[misc]
        except ReadOnlyError:
            self.disconnect()  # type: ignore[attr-defined]
            raise redis.ConnectionError(_DEMOTED) from None


class _ADemotable:
    async def read_response(self, *args: Any, **kw: Any) -> Any:
        try:
            return await super().read_response(*args, **kw)  # type: ignore[misc]
        except ReadOnlyError:
            await self.disconnect()  # type: ignore[attr-defined]
            raise redis.ConnectionError(_DEMOTED) from None


class Connection(_Demotable, redis.Connection):  # type: ignore[misc]
    pass


class SSLConnection(_Demotable, redis.SSLConnection):  # type: ignore[misc]
    pass


class AConnection(_ADemotable, aioredis.Connection):  # type: ignore[misc]
    pass


class ASSLConnection(_ADemotable, aioredis.SSLConnection):  # type: ignore[misc]
    pass


def _tcp_class(url: str, asynchronous: bool) -> dict[str, Any]:
    """The demotion-aware connection class for a redis:// or rediss:// URL (none for unix://)."""
    scheme = url.split("://", 1)[0].lower()
    if scheme not in ("redis", "rediss"):
        return {}
    ssl = scheme == "rediss"
    if asynchronous:
        return {"connection_class": ASSLConnection if ssl else AConnection}
    return {"connection_class": SSLConnection if ssl else Connection}


def _secret(value: Any) -> str | None:
    """A SecretStr's text (or a plain string's), None for none."""
    if value is None:
        return None
    return value.get_secret_value() if hasattr(value, "get_secret_value") else str(value) or None


def _sentinel_kwargs(timeout_s: float, sentinel_password: Any) -> dict[str, Any]:
    kw: dict[str, Any] = {"socket_timeout": timeout_s, "socket_connect_timeout": timeout_s}
    if (pw := _secret(sentinel_password)) is not None:
        kw["password"] = pw
    return kw


def _node_kwargs(target: SentinelTarget) -> dict[str, Any]:
    return {"db": target.db, "username": target.username, "password": target.password}


class BlockingSentinelPool(asentinel.SentinelConnectionPool, aioredis.BlockingConnectionPool):  # type: ignore[misc]
    """A Sentinel-managed pool that waits up to its ``timeout`` for a free connection past ``max_connections``
    (as the API's pools do on one server) instead of failing at once."""


def connect(url: str, timeout_s: float, *, sentinel_password: Any = None, decode: bool = True,
            **kw: Any) -> redis.Redis:
    """A sync client (``decode``: it answers ``str``, as the job code expects); ``max_connections``, ``retry``
    and the like pass through."""
    opts = dict(socket_timeout=timeout_s, socket_connect_timeout=timeout_s, decode_responses=decode, **kw)
    if not is_sentinel(url):
        return redis.Redis.from_url(url, **_tcp_class(url, False), **opts)
    target = parse_sentinel(url)
    group = Sentinel(list(target.hosts), sentinel_kwargs=_sentinel_kwargs(timeout_s, sentinel_password))
    return group.master_for(target.master, redis_class=redis.Redis, connection_pool_class=SentinelConnectionPool,
                            **_node_kwargs(target), **opts)


def aconnect(url: str, timeout_s: float, *, sentinel_password: Any = None, max_connections: int | None = None,
             **kw: Any) -> aioredis.Redis:
    """The async twin. With ``max_connections`` the pool holds at most that many connections and a call past
    them waits up to ``timeout_s`` for one, then fails as Redis being away does."""
    opts = dict(socket_timeout=timeout_s, socket_connect_timeout=timeout_s, decode_responses=True, **kw)
    if not is_sentinel(url):
        opts.update(_tcp_class(url, True))
        if max_connections is None:
            return aioredis.Redis.from_url(url, **opts)
        pool = aioredis.BlockingConnectionPool.from_url(url, max_connections=max_connections, timeout=timeout_s,
                                                        **opts)
        return aioredis.Redis.from_pool(pool)
    target = parse_sentinel(url)
    group = asentinel.Sentinel(list(target.hosts), sentinel_kwargs=_sentinel_kwargs(timeout_s, sentinel_password))
    if max_connections is None:
        return group.master_for(target.master, redis_class=aioredis.Redis, **_node_kwargs(target), **opts)
    return group.master_for(target.master, redis_class=aioredis.Redis, connection_pool_class=BlockingSentinelPool,
                            max_connections=max_connections, timeout=timeout_s, **_node_kwargs(target), **opts)


def cache_connect(url: str, timeout_s: float, *, sentinel_password: Any = None) -> redis.Redis:
    """A client for caches: bytes, short timeouts and no retries (a miss is always an option)."""
    return connect(url, timeout_s, sentinel_password=sentinel_password, decode=False, retry=Retry(NoBackoff(), 0))


def alive(url: str, timeout_s: float = 0.5, *, sentinel_password: Any = None) -> bool:
    """Whether the primary the URL names answers a ping now."""
    try:
        return bool(connect(url, timeout_s, sentinel_password=sentinel_password).ping())
    except redis.RedisError:
        return False


# --- the queue's side: kombu's Sentinel transport and Celery's Sentinel result backend ---

def kombu_url(url: str) -> str:
    """The URL kombu and Celery's result backend read: one ``sentinel://host:port/db`` per Sentinel, joined by
    ``;`` (they take the master's name from the transport options); any other URL as it is."""
    if not is_sentinel(url):
        return url
    t = parse_sentinel(url)
    auth = f"{t.username or ''}:{t.password}@" if t.password else ""
    return ";".join(f"sentinel://{auth}{h if ':' not in h else f'[{h}]'}:{p}/{t.db}" for h, p in t.hosts)


def kombu_options(url: str, timeout_s: float, sentinel_password: Any = None) -> dict[str, Any]:
    """Transport options (broker and result backend) a ``sentinel://`` URL adds: the master's name, and the
    Sentinels' own timeouts and password; none for any other URL."""
    if not is_sentinel(url):
        return {}
    return {"master_name": parse_sentinel(url).master,
            "sentinel_kwargs": _sentinel_kwargs(timeout_s, sentinel_password)}
