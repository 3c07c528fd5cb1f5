"""The API's thread lanes (api.lanes): a lane runs at most its size at once, on threads that are not anyio's
shared pool, and refuses with 503 ``busy`` once a call waited its bound for a place."""

from __future__ import annotations

import threading
import time

import anyio
import pytest

from api.lanes import Lane
from pipeline.errors import Unavailable


def test_a_full_lane_refuses_after_its_wait_and_never_borrows_the_shared_threads() -> None:
    release = threading.Event()
    seen: dict[str, float] = {}

    async def main() -> None:
        lane = Lane("slow things", size=2, wait_s=0.2)
        shared = anyio.to_thread.current_default_thread_limiter()
        async with anyio.create_task_group() as tg:
            for _ in range(2):
                tg.start_soon(lane.run, release.wait, 30)
            with anyio.fail_after(10):
                while lane.busy < 2:
                    await anyio.sleep(0.01)
            seen["shared_borrowed"] = shared.borrowed_tokens  # the two blocked calls hold none of the 40
            t0 = time.monotonic()
            with pytest.raises(Unavailable) as refused:
                await lane.run(time.sleep, 0)
            seen["waited"] = time.monotonic() - t0
            assert refused.value.code == "busy"
            release.set()
        assert await lane.run(lambda: 7) == 7 and lane.busy == 0  # places given back

    anyio.run(main)
    assert seen["shared_borrowed"] == 0
    assert 0.15 <= seen["waited"] < 2.0
