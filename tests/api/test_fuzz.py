"""A fuzzing pass over the OpenAPI schema with schemathesis, against the running stack (Redis, a worker, the
API): no 5xx, every status documented, every response body matching its schema."""

from __future__ import annotations

import shutil
from collections.abc import Iterator

import pytest
import redis
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import not_a_server_error, response_schema_conformance, status_code_conformance

from tests.conftest import settings_env
from tests.live import start_stack

pytestmark = [pytest.mark.fuzz, pytest.mark.faults, pytest.mark.integration]


@pytest.fixture(scope="module")
def api_schema(redis_server, store_dir, tiny_models, tmp_path_factory) -> Iterator[object]:  # type: ignore[no-untyped-def]
    """The whole stack (a worker too, so POST /search ends), limits off so the fuzzer is never throttled."""
    redis.Redis.from_url(redis_server.url(3)).flushdb()
    tmp = tmp_path_factory.mktemp("fuzz")
    shutil.copytree(store_dir, tmp / "data")
    env = settings_env(tmp / "data", tiny_models, redis_server.url(3), IMGSEARCH_RATE_LIMIT_PER_MIN="0",
                       IMGSEARCH_MAX_JOBS_IN_FLIGHT="0")
    live = start_stack(env, tmp / "logs")
    try:
        yield schemathesis.openapi.from_url(f"{live.base}/openapi.json")
    finally:
        live.stop()


def test_no_5xx_and_every_response_as_documented(api_schema) -> None:  # type: ignore[no-untyped-def]
    """Each operation in turn, with hypothesis driving schemathesis's strategies (its pytest plugin's lazy
    fixture loader does not run on this pytest)."""
    checked = []
    for result in api_schema.get_all_operations():
        operation = result.ok()

        @given(case=operation.as_strategy())
        @settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck), database=None)
        def run(case) -> None:  # type: ignore[no-untyped-def]
            case.call_and_validate(checks=[not_a_server_error, status_code_conformance, response_schema_conformance],
                                   timeout=20)

        run()
        checked.append(operation.label)
    assert len(checked) >= 9, checked  # every route of the contract was fuzzed
