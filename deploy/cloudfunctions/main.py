"""``POST /search`` as a Google Cloud Function (2nd gen): the API's blocking contract, enqueuing on the same
Redis (Memorystore) queue as the API, answered by the same workers (Cloud Run GPU workers or any other).

    {"query": "a surprised pikachu face", "limit": 10}  ->  200 {"results": [[post_id, score], ...]}
    a bad query -> 422, no valid key -> 401, over a limit -> 429, Redis down -> 503, the job's deadline
    passed -> 504: {"error": {"code", "message"}}

It admits a job as the API does (pipeline.admission: keys, rate limit, caps, validation) and answers with the
API's contract (api.contract). A filter's nesting is checked by a loop before anything walks it recursively
(pipeline.filters.check_depth), so a filter 300 deep is a 422, never an uncaught RecursionError.

Deployment: see the README ("Google Cloud Functions"); settings come from the function's environment.
"""

from __future__ import annotations

import json
from typing import Any

try:
    import functions_framework

    _http = functions_framework.http
except ImportError:  # tests and local runs: the handler is a plain function
    def _http(fn: Any) -> Any:
        return fn

_clients: dict[str, Any] = {}


def _setup() -> tuple[Any, Any, Any]:
    """One Redis client, one Celery producer and the admission over them per function instance, made on its
    first request."""
    if not _clients:
        from pipeline.admission.admit import Admission
        from pipeline.jobs.store import JobStore, connect
        from pipeline.settings import get_api_settings
        from workers.celery_app import SEARCH_TASK, client_app, send_job

        s = get_api_settings()
        celery = client_app(s)
        pw = s.redis_sentinel_password  # a Sentinel group's own, where the URL names one
        r = connect(s.redis_url, s.redis_socket_timeout_s, sentinel_password=pw)
        limits = connect(s.limits_redis_url, 0.5, sentinel_password=pw) if s.limits_redis_url else None

        def send(job_id: str) -> None:
            send_job(celery, SEARCH_TASK, job_id, s.search_queue)

        jobs = JobStore.from_settings(s, r, limits=limits, send=send)
        _clients.update(settings=s, celery=celery, jobs=jobs, admission=Admission(s, jobs, limits))
    return _clients["settings"], _clients["jobs"], _clients["admission"]


def handle(body: Any, token: str | None = None, peer: str = "unknown",
           forwarded_for: str | list[str] = "") -> tuple[int, dict[str, Any]]:
    """(status, JSON body) for one request body: the API's admission and ``POST /search`` contract."""
    import redis

    from api import contract
    from api.errors import error_body
    from pipeline.admission.addresses import client_address
    from pipeline.errors import ImgSearchError, Unavailable

    try:
        query, params = contract.request_of(body)
        s, jobs, admission = _setup()
        caller = admission.caller(token, client_address(peer, forwarded_for, admission.trusted))
        job = admission.admit_sync(caller, query, params)
        return 200, contract.answer(job.id, jobs.wait(job.id, s.search_wait_s), s.search_wait_s)
    except ImgSearchError as exc:
        err = exc
    except (redis.RedisError, OSError) as exc:
        err = Unavailable(f"the job store (Redis) is unreachable: {type(exc).__name__}")
    return err.status, error_body(err.code, err.message)


@_http
def search(request: Any) -> tuple[str, int, dict[str, str]]:
    from api.auth import key_of
    from api.errors import error_body

    if request.method != "POST":
        status, body = 405, error_body("method_not_allowed", "POST a JSON body: {\"query\": ...}")
    else:
        headers = getattr(request, "headers", {}) or {}
        token = key_of(headers.get("Authorization"), headers.get("X-API-Key"))
        forwarded = headers.getlist("X-Forwarded-For") if hasattr(headers, "getlist") else \
            headers.get("X-Forwarded-For", "")  # every line of it (Flask's headers), as the API reads them
        try:
            payload = request.get_json(silent=True)
        except RecursionError:  # JSON nested past the decoder's stack ("silent" catches ValueError only)
            payload = None
        status, body = handle(payload, token, getattr(request, "remote_addr", None) or "unknown", forwarded)
    return json.dumps(body), status, {"Content-Type": "application/json"}
