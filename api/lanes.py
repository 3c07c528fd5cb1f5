"""The API's thread lanes: blocking calls run on threads of their own kind, never on anyio's shared pool.

anyio runs every ``to_thread.run_sync`` without a limiter on one pool of 40 threads; an ``image_url`` download
that a slow host holds for its whole deadline would take one of them, and forty would stall every route that
needs a thread (Celery's send, blob reads). Each lane here has its own ``CapacityLimiter``: at most ``size``
calls of its kind run at once, on threads counted apart from the shared 40, and a call waits ``wait_s`` at most
for a place before it is refused with 503 ``busy`` (so a flood queues nothing unbounded either)."""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import anyio

from pipeline.errors import Unavailable
from pipeline.settings import ApiSettings

T = TypeVar("T")


class Lane:
    def __init__(self, name: str, size: int, wait_s: float) -> None:
        self.name, self.size, self.wait_s = name, size, wait_s
        self._gate = anyio.CapacityLimiter(size)  # places, waited for with a deadline
        self._threads = anyio.CapacityLimiter(size)  # the threads' own limiter: never the shared default

    async def run(self, fn: Callable[..., T], *args: object) -> T:
        """``fn(*args)`` on one of this lane's threads, or Unavailable ``busy`` after ``wait_s`` without a place."""
        placed = False
        with anyio.move_on_after(self.wait_s):
            await self._gate.acquire()
            placed = True
        if not placed:
            raise Unavailable(f"{self.size} {self.name} are under way on this server; retry shortly", code="busy")
        try:
            return await anyio.to_thread.run_sync(fn, *args, limiter=self._threads)
        finally:
            self._gate.release()

    @property
    def busy(self) -> int:
        return int(self._gate.borrowed_tokens)


class Lanes:
    """The API's lanes (made in ``lifespan``, on ``app.state.lanes``)."""

    def __init__(self, settings: ApiSettings) -> None:
        wait = settings.lane_wait_s
        self.fetch = Lane("image downloads", settings.image_fetch_threads, wait)
        self.decode = Lane("picture decodes", settings.image_decode_threads, wait)
        self.send = Lane("queue sends", settings.queue_send_threads, wait)
        self.blobs = Lane("image store calls", settings.blob_io_threads, wait)
