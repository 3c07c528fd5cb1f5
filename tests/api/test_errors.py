"""The error table every edge answers with: each error's HTTP status and headers (carried by its class), the
status a failed or late job answers ``POST /search`` with, the one body shape, and the one reading of a key."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any

import pytest

from api import contract
from api.auth import key_of
from api.errors import error_body, headers_of
from pipeline import errors as e
from pipeline.breaker import CircuitOpen
from pipeline.types import ErrorInfo, Job

ROOT = Path(__file__).resolve().parents[2]
RETRY = {"Retry-After": "1"}


@pytest.mark.parametrize(("exc", "status", "headers"), [
    (e.InvalidRequest("x"), 422, None), (e.Rejected("x", code="vector_store_rejected"), 422, None),
    (e.NotFound("x"), 404, None), (e.Forbidden("x"), 403, None), (e.Conflict("x"), 409, None),
    (e.Unauthorized("x"), 401, {"WWW-Authenticate": 'Bearer realm="imgsearch"'}),
    (e.RateLimited("x", 2.2), 429, {"Retry-After": "3"}), (e.RateLimited("x", 0.1, code="too_many_jobs"), 429, RETRY),
    (e.Unavailable("x", code="busy"), 503, RETRY), (CircuitOpen("x", code="vector_store_unavailable"), 503, RETRY),
    (e.DeadlineExceeded("x", code="timeout"), 504, None), (e.ModelLoadError("x"), 500, None),
    (e.StoreError("x", code="invalid_request"), 500, None), (e.ImgSearchError("x"), 500, None),
])
def test_each_error_carries_its_status_and_headers(exc: e.ImgSearchError, status: int,
                                                  headers: dict[str, str] | None) -> None:
    assert (exc.status, headers_of(exc)) == (status, headers)


def _failed(code: str | None) -> Job:
    return Job(id="j", status="failed", query="q", created_at=0.0,
               error=ErrorInfo(code=code, message="why") if code else None)


@pytest.mark.parametrize(("code", "status"), [
    ("deadline_exceeded", 504), ("cancelled", 409), ("invalid_request", 422), ("unavailable", 503),
    ("vector_store_unavailable", 503), ("blob_store_unavailable", 503), ("image_search_unavailable", 503),
    ("vector_store_rejected", 422), ("not_found", 500), ("unknown_post", 500), ("store_error", 500),
    ("corrupt_features", 500), ("search_failed", 500), ("busy", 500), ("bad_image", 500),
])
def test_a_failed_job_answers_with_the_status_of_its_recorded_code(code: str, status: int) -> None:
    with pytest.raises(e.ImgSearchError) as got:
        contract.answer("j", _failed(code), 1.0)
    assert (got.value.status, got.value.code, got.value.message) == (status, code, "why")


def test_a_failed_job_without_a_reason_and_a_late_one() -> None:
    with pytest.raises(e.ImgSearchError) as failed:
        contract.answer("j", _failed(None), 1.0)
    assert (failed.value.status, failed.value.code, failed.value.message) == (500, "search_failed", "the search failed")
    with pytest.raises(e.DeadlineExceeded) as late:
        contract.answer("j", None, 2.5)
    assert (late.value.status, late.value.code) == (504, "timeout") and "within 2.5 s" in late.value.message


@pytest.mark.parametrize(("authorization", "api_key", "key"), [
    ("Bearer k1 ", None, "k1"), ("bEaReR k1", "k2", "k1"), ("Basic k1", "k2", "k2"), (None, "k2", "k2"),
    ("", None, None), ("Bearer", "k2", "k2"),
])
def test_every_edge_reads_the_key_alike(authorization: str | None, api_key: str | None, key: str | None) -> None:
    assert key_of(authorization, api_key) == key


def _cloud_function() -> Any:
    spec = importlib.util.spec_from_file_location("cf_errors", ROOT / "deploy" / "cloudfunctions" / "main.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_cloud_function_reads_the_key_and_answers_errors_in_the_one_shape(monkeypatch: pytest.MonkeyPatch) -> None:
    cf = _cloud_function()
    seen: list[Any] = []

    def handle(body: Any, token: str | None, peer: str, forwarded: Any) -> tuple[int, dict[str, Any]]:
        seen.append(token)
        return 200, {}

    monkeypatch.setattr(cf, "handle", handle)

    class Request:
        method = "POST"
        headers = {"Authorization": "Bearer sekrit"}
        remote_addr = "10.0.0.1"

        def get_json(self, silent: bool = False) -> dict[str, Any]:
            return {"query": "x"}

    cf.search(Request())
    Request.method = "GET"
    text, status, _ = cf.search(Request())
    assert seen == ["sekrit"]
    assert status == 405 and json.loads(text) == error_body("method_not_allowed", 'POST a JSON body: {"query": ...}')
