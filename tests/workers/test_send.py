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
