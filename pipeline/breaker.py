"""A circuit breaker per dependency (the vector store, the blob store).

After ``failures`` failures in a row the circuit opens: calls fail at once, without waiting on a dependency
that is down or slow, for ``reset_s`` seconds. Then one trial call goes through (half-open); its success
closes the circuit, its failure opens it again. What counts as a failure: the dependency's own errors
(``Unavailable``) and timeouts; a caller's mistake (a bad filter, a missing blob) does not.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import TimeoutError as FutureTimeout
from contextlib import contextmanager
from typing import Literal, TypeVar

from pipeline.errors import Unavailable

T = TypeVar("T")
State = Literal["closed", "open", "half_open"]
# a job's own deadline running out is not counted here: the caller knows whether the dependency had its full
# time (and then calls failure() itself)
FAILURES = (Unavailable, TimeoutError, FutureTimeout, ConnectionError)


class CircuitOpen(Unavailable):
    """Raised instead of calling a dependency whose circuit is open; its code names the dependency. Its message
    names the dependency and how long to wait, nothing else: public."""

    public = True


class Breaker:
    def __init__(self, name: str, failures: int = 5, reset_s: float = 10.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.name, self.threshold, self.reset_s, self.clock = name, failures, reset_s, clock
        self.code = f"{name}_unavailable"
        self._lock = threading.Lock()
        self._failures = 0
        self._opened_at: float | None = None
        self._trial = False  # a half-open trial call is in flight
        self.opened = 0  # times the circuit opened (for metrics and tests)

    @property
    def state(self) -> State:
        with self._lock:
            return self._state()

    def _state(self) -> State:
        if self._opened_at is None:
            return "closed"
        return "open" if self.clock() - self._opened_at < self.reset_s else "half_open"

    def allow(self) -> None:
        """Raise CircuitOpen unless a call may go through now (taking the half-open trial if it is free)."""
        with self._lock:
            state = self._state()
            if state == "closed":
                return
            if state == "half_open" and not self._trial:
                self._trial = True
                return
            wait = max(0.0, self.reset_s - (self.clock() - (self._opened_at or 0.0)))
        raise CircuitOpen(f"the {self.name.replace('_', ' ')} failed {self.threshold} times in a row; "
                          f"not calling it for {wait:.1f} s more (circuit open)", code=self.code)

    def success(self) -> None:
        with self._lock:
            self._failures, self._opened_at, self._trial = 0, None, False

    def failure(self) -> None:
        with self._lock:
            self._failures += 1
            if self._trial or (self._opened_at is None and self._failures >= self.threshold):
                self.opened += 1
                self._opened_at, self._trial = self.clock(), False

    @contextmanager
    def attempt(self) -> Iterator[None]:
        """Around one call of the dependency: refused while open; its outcome counted."""
        self.allow()
        try:
            yield
        except FAILURES:
            self.failure()
            raise
        except BaseException:
            # not the dependency's fault; a half-open trial that ended so leaves the circuit as it was
            with self._lock:
                self._trial = False
            raise
        self.success()

    def call(self, fn: Callable[..., T], *args: object) -> T:
        with self.attempt():
            return fn(*args)
