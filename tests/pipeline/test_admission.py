"""Admission against a real Redis: the in-flight cap holds under concurrent requests (counting and adding is one
script), the queue cap and the rate limit refuse, and a refused or unsendable job leaves nothing behind."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest
import redis

from pipeline.admission.admit import Admission
from pipeline.admission.callers import Caller
from pipeline.errors import InvalidRequest, RateLimited, Unavailable
from pipeline.jobs.keys import OPEN_KEY, inflight_key, job_key
from pipeline.jobs.store import JobStore, connect
from pipeline.settings import Settings

pytestmark = pytest.mark.integration


def _admission(url: str, sent: list[str], **over: object) -> tuple[Admission, redis.Redis]:
    r = connect(url, 5)
    r.flushdb()
    s = Settings(redis_url=url, **over)  # type: ignore[arg-type]
    jobs = JobStore.from_settings(s, r, send=sent.append)
    return Admission(s, jobs), r


def test_the_in_flight_cap_holds_under_concurrent_requests(redis_server) -> None:  # type: ignore[no-untyped-def]
    sent: list[str] = []
    adm, r = _admission(redis_server.url(11), sent, max_jobs_in_flight=3, rate_limit_per_min=0)
    caller = Caller("ip:10.0.0.1")

    def one(_: int) -> str:
        try:
            return adm.admit_sync(caller, "a red circle", {}).id
        except RateLimited as exc:
            assert exc.code == "too_many_jobs"
            return ""

    with ThreadPoolExecutor(16) as pool:
        ids = [i for i in pool.map(one, range(40)) if i]
    assert len(ids) == 3 and sorted(ids) == sorted(sent)
    assert r.zcard(inflight_key(caller.id)) == 3 and r.zcard(OPEN_KEY) == 3
    assert all(r.exists(job_key(i)) for i in ids)
    other = adm.admit_sync(Caller("ip:10.0.0.2"), "a blue square", {})  # another caller has its own cap
    assert other.inflight_key == inflight_key("ip:10.0.0.2")


def test_queue_cap_rate_limit_and_validation_refuse_before_anything_is_written(redis_server) -> None:  # type: ignore[no-untyped-def]
    sent: list[str] = []
    adm, r = _admission(redis_server.url(11), sent, max_queue_length=2, rate_limit_per_min=60, rate_limit_burst=3)
    r.rpush("search", "x", "y")  # two waiting
    with pytest.raises(Unavailable) as full:
        adm.admit_sync(Caller("ip:a"), "q", {})
    assert full.value.code == "queue_full" and r.zcard(OPEN_KEY) == 0 and r.zcard(inflight_key("ip:a")) == 0
    r.delete("search")
    with pytest.raises(InvalidRequest):
        adm.admit_sync(Caller("ip:a"), "q", {"filter": {"score": {"$regex": "x"}}})
    adm.admit_sync(Caller("ip:b"), "q", {})  # the queue-full refusal above took one of ip:a's tokens, not ip:b's
    adm.admit_sync(Caller("ip:b"), "q", {})
    adm.admit_sync(Caller("ip:b"), "q", {})
    with pytest.raises(RateLimited) as limited:
        adm.admit_sync(Caller("ip:b"), "q", {})
    assert limited.value.code == "rate_limited" and limited.value.retry_after >= 1 and len(sent) == 3


def test_a_job_the_queue_refuses_leaves_no_record_and_no_count(redis_server) -> None:  # type: ignore[no-untyped-def]
    def refuse(_: str) -> None:
        raise ConnectionError("broker away")

    r = connect(redis_server.url(11), 5)
    r.flushdb()
    s = Settings(redis_url=redis_server.url(11))
    adm = Admission(s, JobStore.from_settings(s, r, send=refuse))
    with pytest.raises(Unavailable):  # the broker's error, as the API's face answers it (503)
        adm.admit_sync(Caller("ip:c"), "q", {})
    assert r.zcard(OPEN_KEY) == 0 and r.zcard(inflight_key("ip:c")) == 0 and not list(r.scan_iter("imgsearch:job:*"))
