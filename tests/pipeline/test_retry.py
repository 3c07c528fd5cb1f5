"""The one retry policy (pipeline/retry.py): what it retries, how long it waits, when it gives up."""

from __future__ import annotations

import pytest

from pipeline.retry import RetryLater, retrying


class Flaky:
    """Fails with each of ``errors`` in turn, then answers."""

    def __init__(self, *errors: BaseException) -> None:
        self.errors, self.calls = list(errors), 0

    def __call__(self) -> str:
        self.calls += 1
        if self.errors:
            raise self.errors.pop(0)
        return "ok"


def test_backoff_doubles_up_to_its_cap_and_a_server_wait_is_honoured_within_its_own() -> None:
    slept: list[float] = []
    f = Flaky(OSError("a"), OSError("b"), OSError("c"), RetryLater("HTTP 429", 7), RetryLater("HTTP 503", 999),
              RetryLater("HTTP 502"))
    again = retrying((OSError, RetryLater), attempts=10, first_s=0.5, max_s=1.5, server_wait_max_s=60,
                     sleep=slept.append)
    assert again(f) == "ok" and f.calls == 7
    assert slept == [0.5, 1.0, 1.5, 7, 60, 1.5]  # the 6th try's own backoff (no server wait named): capped


def test_tries_are_counted_and_the_last_error_is_raised_as_it_was() -> None:
    f = Flaky(*(OSError(str(i)) for i in range(5)))
    with pytest.raises(OSError, match="^2$"):
        retrying((OSError,), attempts=3, sleep=lambda s: None)(f)
    assert f.calls == 3


def test_errors_not_named_are_not_retried() -> None:
    f = Flaky(ValueError("a caller's mistake"))
    with pytest.raises(ValueError):
        retrying((OSError,), attempts=5, sleep=lambda s: None)(f)
    assert f.calls == 1


def test_no_wait_is_started_that_would_end_past_the_time_allowed() -> None:
    slept: list[float] = []
    f = Flaky(*(OSError(str(i)) for i in range(10)))
    with pytest.raises(OSError, match="^2$"):  # waits 1 + 2 fit in 4 s; the next (4) would end past it
        retrying((OSError,), within_s=4.0, first_s=1.0, max_s=8.0, sleep=slept.append)(f)
    assert slept == [1.0, 2.0] and f.calls == 3
