"""The one retry policy, over tenacity: every place that tries again (a job's end written while Redis restarts,
a Reddit listing, an image download) says what is worth another try, how many tries or how long in all, and the
backoff; an answer that names its own wait (a 429's or 503's Retry-After) raises ``RetryLater`` with it.

Tenacity rather than redis-py's ``Retry`` (which counts attempts on one client) because two of the three loops
bound time, not tries, and one honours the server's own wait."""

from __future__ import annotations

import time
from collections.abc import Callable

from tenacity import (
    RetryCallState,
    Retrying,
    retry_if_exception_type,
    stop_after_attempt,
    stop_any,
    stop_before_delay,
    stop_never,
)
from tenacity.stop import stop_base


class RetryLater(Exception):
    """An answer worth another try (a 429, a 5xx), after ``wait_s`` seconds if the server named them."""

    def __init__(self, why: str, wait_s: float | None = None) -> None:
        super().__init__(why)
        self.wait_s = wait_s


def retrying(on: tuple[type[BaseException], ...], *, attempts: int | None = None, within_s: float | None = None,
             first_s: float = 0.5, max_s: float = 30.0, server_wait_max_s: float = 120.0,
             sleep: Callable[[float], None] = time.sleep,
             before_sleep: Callable[[RetryCallState], None] | None = None) -> Retrying:
    """Tries of a block (``for attempt in retrying(...): with attempt: ...``) while it raises one of ``on``: at
    most ``attempts`` of them, and none whose wait would end past ``within_s`` seconds from the first. Waits
    double from ``first_s`` up to ``max_s``; a ``RetryLater`` with a wait of its own is waited that long (at most
    ``server_wait_max_s``). The last exception is raised as it was once the tries are spent."""
    stops: list[stop_base] = []
    if attempts is not None:
        stops.append(stop_after_attempt(attempts))
    if within_s is not None:
        stops.append(stop_before_delay(within_s))
    stop = stop_any(*stops) if stops else stop_never

    def wait(state: RetryCallState) -> float:
        exc = state.outcome.exception() if state.outcome is not None else None
        if isinstance(exc, RetryLater) and exc.wait_s is not None:
            return min(max(exc.wait_s, 0.0), server_wait_max_s)
        return min(first_s * 2 ** (state.attempt_number - 1), max_s)

    return Retrying(stop=stop, wait=wait, retry=retry_if_exception_type(on), sleep=sleep, reraise=True,
                    before_sleep=before_sleep)


def last_error(state: RetryCallState) -> str:
    """The failed try's exception, as a log line would show it."""
    exc = state.outcome.exception() if state.outcome is not None else None
    return f"{type(exc).__name__}: {exc}" if exc is not None and str(exc) else type(exc).__name__
