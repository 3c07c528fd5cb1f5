"""``POST /search`` as a Google Cloud Function (2nd gen): the API's blocking contract, enqueuing on the same
Redis (Memorystore) queue as the API, answered by the same workers (Cloud Run GPU workers or any other).

    {"query": "a surprised pikachu face", "limit": 10}  ->  200 {"results": [[post_id, score], ...]}
    a bad query -> 422, Redis down -> 503, the job's deadline passed -> 504: {"error": {"code", "message"}}

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
    """One Redis client and one Celery producer per function instance, made on its first request."""
    if not _clients:
        import redis

        from pipeline.settings import get_settings
        from workers.celery_app import client_app

        s = get_settings()
        _clients.update(settings=s, celery=client_app(s), redis=redis.Redis.from_url(
            s.redis_url, socket_timeout=s.redis_socket_timeout_s, socket_connect_timeout=s.redis_socket_timeout_s))
    return _clients["settings"], _clients["redis"], _clients["celery"]


def _error(status: int, code: str, message: str) -> tuple[int, dict[str, Any]]:
    return status, {"error": {"code": code, "message": message}}


def handle(body: Any) -> tuple[int, dict[str, Any]]:
    """(status, JSON body) for one request body."""
    import redis
    from pydantic import ValidationError

    from api.schemas import SearchRequest
    from pipeline.jobs import submit_blocking, wait_blocking

    try:
        req = SearchRequest.model_validate(body if isinstance(body, dict) else {})
    except ValidationError as exc:
        first = exc.errors()[0]
        return _error(422, "invalid_request", f"{'.'.join(str(p) for p in first['loc']) or 'body'}: {first['msg']}")
    s, r, celery = _setup()
    try:
        job = submit_blocking(r, celery, s, req.query, req.model_dump(exclude={"query"}, exclude_unset=True))
        done = wait_blocking(r, job.id, s.search_wait_s)
    except (redis.RedisError, OSError) as exc:
        return _error(503, "unavailable", f"the job store (Redis) is unreachable: {type(exc).__name__}")
    if done is None:
        return _error(504, "timeout", f"job {job.id} did not finish within {s.search_wait_s:g} s")
    if done.status == "failed":
        err = done.error
        code = err.code if err else "search_failed"
        status = {"deadline_exceeded": 504, "cancelled": 409, "invalid_request": 422}.get(
            code, 503 if code.endswith("unavailable") else 500)
        return _error(status, code, err.message if err else "the search failed")
    return 200, {"results": [[x.id, x.score] for x in done.results or []]}


@_http
def search(request: Any) -> tuple[str, int, dict[str, str]]:
    if request.method != "POST":
        status, body = _error(405, "method_not_allowed", "POST a JSON body: {\"query\": ...}")
    else:
        status, body = handle(request.get_json(silent=True))
    return json.dumps(body), status, {"Content-Type": "application/json"}
