"""Who is calling, and what they may see: API keys (kept as SHA-256 hashes), a caller's identity for its limits,
and the ownership and role checks every edge applies.

Keys are random 32-byte tokens, so a plain SHA-256 is enough to keep them unrecoverable from the settings
(a slow password hash guards guessable secrets; these are not guessable). With no key configured the API
is open, as for local use, and the admin routes are closed."""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass

from pipeline.errors import Forbidden, Unauthorized
from pipeline.jobs.store import unknown_job
from pipeline.settings import ApiSettings
from pipeline.types import Job


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def new_key() -> str:
    return "isk_" + secrets.token_urlsafe(32)


@dataclass(frozen=True)
class Caller:
    id: str  # what limits count against: "key:<name>" or "ip:<address>"
    key_name: str | None = None
    admin: bool = False
    monitor: bool = False


class Callers:
    """The configured keys, and the checks made with them."""

    def __init__(self, settings: ApiSettings) -> None:
        self.keys = {k.sha256.lower(): k for k in settings.api_keys}

    @property
    def open(self) -> bool:
        return not self.keys

    def caller(self, token: str | None, address: str, public: bool = False) -> Caller:
        """The caller: by address while no key is configured (or, on a ``public`` route, when it sends none); else
        by key (Unauthorized without a valid one)."""
        if self.open or (public and not token):
            return Caller(f"ip:{address}")
        if not token:
            raise Unauthorized("an API key is required: 'Authorization: Bearer <key>' or 'X-API-Key: <key>'")
        key = self.keys.get(hash_key(token))
        if key is None:
            raise Unauthorized("the API key is not valid")
        return Caller(f"key:{key.name}", key.name, key.admin, key.monitor)

    def check_owner(self, caller: Caller, job: Job) -> Job:
        """``job`` if ``caller`` may read, follow or cancel it: its own, any with an admin key, any while the API
        is open; else the very answer an unknown id gets (NotFound), so a job's id tells nothing to others."""
        if self.open or caller.admin or job.owner == caller.id:
            return job
        raise unknown_job(job.id)

    def sees_fleet(self, caller: Caller | None) -> bool:
        """Whether ``caller`` may see the fleet (/metrics, /readyz's workers: host names, PIDs, circuits, queue
        depths): anyone while the API is open (local use), else an admin or a monitor key only."""
        return self.open or (caller is not None and (caller.admin or caller.monitor))

    def check_admin(self, caller: Caller) -> None:
        if not caller.admin:
            raise Forbidden("this route needs an admin API key" if not self.open else
                            "admin routes are closed while no API keys are configured (IMGSEARCH_API_KEYS)")
