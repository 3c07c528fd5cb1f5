"""Sending a job while Redis is frozen (SIGSTOP: a primary stalled, or one a failover left behind) fails within
the socket timeout, so the API answers 503 promptly instead of holding the caller."""

from __future__ import annotations

import signal
import threading
import time
import uuid

import pytest

from cli import stack
from pipeline.settings import ApiSettings
from workers.celery_app import SEARCH_TASK, client_app, send_job

pytestmark = pytest.mark.integration
TIMEOUT_S = 0.5


def test_a_send_to_a_frozen_redis_ends_within_its_timeouts(tmp_path) -> None:  # type: ignore[no-untyped-def]
    port = stack.free_port()
    server = stack.start_redis(port, tmp_path, tmp_path / "redis.log")
    celery = client_app(ApiSettings(redis_url=f"redis://127.0.0.1:{port}/0", redis_socket_timeout_s=TIMEOUT_S))
    ended = threading.Event()
    took: list[float] = []
    try:
        send_job(celery, SEARCH_TASK, uuid.uuid4().hex, "q")  # the broker connection made while Redis answers
        server.signal_group(signal.SIGSTOP)

        def send() -> None:
            t0 = time.monotonic()
            try:
                send_job(celery, SEARCH_TASK, uuid.uuid4().hex, "q")
            except Exception:  # noqa: BLE001 - the publish's error (Redis away): what the API answers 503 for
                pass
            took.append(time.monotonic() - t0)
            ended.set()

        threading.Thread(target=send, daemon=True).start()
        # the publish tries three times (the publish retry policy), each bounded by the socket timeout
        assert ended.wait(12 * TIMEOUT_S), "the send was still blocked on the frozen Redis"
    finally:
        server.signal_group(signal.SIGCONT)
        ended.wait(10)
        celery.close()
        server.stop()
    assert took and took[0] < 12 * TIMEOUT_S


@pytest.mark.parametrize("frozen", ["before the send", "while it waits"])
def test_a_task_whose_result_is_awaited_ends_within_its_timeouts_on_a_frozen_redis(tmp_path, frozen: str) -> None:  # type: ignore[no-untyped-def]
    """The explain and takedown routes send a task and wait on its result: Celery subscribes to the result's
    channel on the result backend's own connections, which take the socket timeout too (``redis_socket_timeout``),
    so a frozen Redis ends the wait with an error (the route's 503) instead of holding the caller's thread."""
    port = stack.free_port()
    server = stack.start_redis(port, tmp_path, tmp_path / "redis.log")
    celery = client_app(ApiSettings(redis_url=f"redis://127.0.0.1:{port}/0", redis_socket_timeout_s=TIMEOUT_S))
    ended = threading.Event()
    outcome: list[str] = []
    wait_s = 2 * TIMEOUT_S  # no worker consumes "q": without the freeze the wait ends by this timeout
    try:
        celery.send_task(SEARCH_TASK, args=[{}], queue="q").forget()  # connections made while Redis answers
        if frozen == "before the send":
            server.signal_group(signal.SIGSTOP)

        def wait() -> None:
            try:
                result = celery.send_task(SEARCH_TASK, args=[{}], queue="q")
                if frozen == "while it waits":
                    server.signal_group(signal.SIGSTOP)
                result.get(timeout=wait_s)
                outcome.append("answered")
            except Exception as exc:  # noqa: BLE001 - any error ends the wait: what the route answers 503 for
                outcome.append(type(exc).__name__)
            ended.set()

        threading.Thread(target=wait, daemon=True).start()
        assert ended.wait(wait_s + 12 * TIMEOUT_S), "the send or the wait was still blocked on the frozen Redis"
        assert outcome and outcome[0] != "answered", outcome
        server.signal_group(signal.SIGCONT)
        # Celery logs that "the Celery application must be restarted" when its reconnects run out; the API's app
        # need not be: once Redis answers again, the next task's result is answered
        result = celery.send_task(SEARCH_TASK, args=[{}], queue="q")
        celery.backend.mark_as_done(result.id, {"ok": 1})  # as a worker would store it
        assert result.get(timeout=10 * TIMEOUT_S) == {"ok": 1}
    finally:
        server.signal_group(signal.SIGCONT)
        ended.wait(10)
        celery.close()
        server.stop()
