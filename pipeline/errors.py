"""One error family; each error carries a stable code and the HTTP status class every edge answers it with."""

from __future__ import annotations


class ImgSearchError(Exception):
    """Base error. ``code`` is stable and machine-readable; the message is for people."""

    code = "internal_error"
    status = 500  # what an HTTP edge answers with (api.errors); a subclass inherits its parent's
    # the message speaks of the caller's request (or of waiting) only, in our words: a job's public record may
    # show it. Others may carry a store's address, a key, a path or an exception's text (public_error).
    public = False

    def __init__(self, message: str, *, code: str | None = None) -> None:
        super().__init__(message)
        if code:
            self.code = code

    @property
    def message(self) -> str:
        return str(self.args[0]) if self.args else self.code


class InvalidRequest(ImgSearchError):
    code = "invalid_request"
    status = 422
    public = True


class NotFound(ImgSearchError):
    code = "not_found"
    status = 404
    public = True


class Forbidden(ImgSearchError):
    code = "forbidden"
    status = 403


class Conflict(ImgSearchError):
    """The request does not fit the resource's state (e.g. cancelling a job that already ended)."""

    code = "conflict"
    status = 409


class Cancelled(ImgSearchError):
    """The client cancelled the job (raised on a worker); an edge waiting on the job answers 409, a conflict."""

    code = "cancelled"
    status = 409
    public = True


class Rejected(InvalidRequest):
    """A store refused a request as malformed (a 4xx that is not about keys, limits or a missing index): the
    caller's mistake. It fails that job with the caller's error and never counts against the store's circuit."""

    code = "rejected"


class Unavailable(ImgSearchError):
    """A dependency (Redis, a store) can't be reached; retry later."""

    code = "unavailable"
    status = 503


class ModelLoadError(ImgSearchError):
    code = "model_load_error"


class StoreError(ImgSearchError):
    code = "store_error"


class DeadlineExceeded(ImgSearchError):
    code = "deadline_exceeded"
    status = 504
    public = True


class Unauthorized(ImgSearchError):
    """No valid API key where one is needed."""

    code = "unauthorized"
    status = 401


class RateLimited(ImgSearchError):
    """Over a limit (the rate, or the caller's jobs in flight); ``retry_after`` in whole seconds."""

    code = "rate_limited"
    status = 429

    def __init__(self, message: str, retry_after: float, code: str | None = None) -> None:
        super().__init__(message, code=code)
        self.retry_after = max(1, int(retry_after + 0.999))


# What a job's public record says of a failure. The caller's own mistakes (a bad filter, an unknown post, a
# picture that is no picture) and the other errors marked ``public`` keep our message, which speaks of the request
# only. Anything else gets a fixed sentence for its kind: a store's address, a key, a path or an exception's text
# may sit in its message, and they go to the logs, with the job's id, instead.
_SAFE_MESSAGES: tuple[tuple[type[ImgSearchError], str], ...] = (
    (Unavailable, "a service the search needs is unavailable; retry shortly"),
    (StoreError, "a store answered with data the search could not use"),
    (ModelLoadError, "the search models are not loaded on the worker that took the job"),
)
INTERNAL = "search_failed"
MAX_PUBLIC_MESSAGE = 300


def public_error(exc: BaseException) -> tuple[str, str]:
    """(code, message) safe to show the job's caller: a stable code, and a message that holds no internals."""
    if isinstance(exc, ImgSearchError) and exc.public:
        return exc.code, exc.message[:MAX_PUBLIC_MESSAGE]
    if isinstance(exc, ImgSearchError):
        safe = next((m for cls, m in _SAFE_MESSAGES if isinstance(exc, cls)), "the search failed")
        return exc.code, safe
    return INTERNAL, "the search failed on an internal error (logged with this job's id)"


# The failures an edge waiting on a job tells apart (any other is a 500). A job's record keeps the code only, so
# its error is the class whose code the recorded one is or ends with (a store's ``vector_store_unavailable``).
_JOB_FAILURES: tuple[type[ImgSearchError], ...] = (DeadlineExceeded, Cancelled, InvalidRequest, Rejected, Unavailable)


def job_failure(code: str, message: str) -> ImgSearchError:
    """A failed job's recorded error (``public_error``'s code and message) as the error it answers with."""
    kind = next((cls for cls in _JOB_FAILURES if code.endswith(cls.code)), ImgSearchError)
    return kind(message, code=code)


def describe(exc: BaseException) -> str:
    """The whole story for the logs: ``TypeName: message``."""
    return f"{type(exc).__name__}: {exc}"
