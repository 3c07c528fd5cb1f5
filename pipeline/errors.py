"""One error family; each error carries a stable code that the API maps to HTTP."""

from __future__ import annotations


class ImgSearchError(Exception):
    """Base error. ``code`` is stable and machine-readable; the message is for people."""

    code = "internal_error"
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
    public = True


class NotFound(ImgSearchError):
    code = "not_found"
    public = True


class Forbidden(ImgSearchError):
    code = "forbidden"


class Conflict(ImgSearchError):
    """The request does not fit the resource's state (e.g. cancelling a job that already ended)."""

    code = "conflict"


class Cancelled(ImgSearchError):
    code = "cancelled"
    public = True


class Rejected(InvalidRequest):
    """A store refused a request as malformed (a 4xx that is not about keys, limits or a missing index): the
    caller's mistake. It fails that job with the caller's error and never counts against the store's circuit."""

    code = "rejected"


class Unavailable(ImgSearchError):
    """A dependency (Redis, a store) can't be reached; retry later."""

    code = "unavailable"


class ModelLoadError(ImgSearchError):
    code = "model_load_error"


class StoreError(ImgSearchError):
    code = "store_error"


class DeadlineExceeded(ImgSearchError):
    code = "deadline_exceeded"
    public = True


class Unauthorized(ImgSearchError):
    """No valid API key where one is needed."""

    code = "unauthorized"


class RateLimited(ImgSearchError):
    """Over a limit (the rate, or the caller's jobs in flight); ``retry_after`` in whole seconds."""

    code = "rate_limited"

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


def describe(exc: BaseException) -> str:
    """The whole story for the logs: ``TypeName: message``."""
    return f"{type(exc).__name__}: {exc}"
