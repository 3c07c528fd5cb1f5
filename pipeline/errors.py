"""One error family; each error carries a stable code that the API maps to HTTP."""

from __future__ import annotations


class ImgSearchError(Exception):
    """Base error. ``code`` is stable and machine-readable; the message is for people."""

    code = "internal_error"

    def __init__(self, message: str, *, code: str | None = None) -> None:
        super().__init__(message)
        if code:
            self.code = code

    @property
    def message(self) -> str:
        return str(self.args[0]) if self.args else self.code


class InvalidRequest(ImgSearchError):
    code = "invalid_request"


class NotFound(ImgSearchError):
    code = "not_found"


class Forbidden(ImgSearchError):
    code = "forbidden"


class Conflict(ImgSearchError):
    """The request does not fit the resource's state (e.g. cancelling a job that already ended)."""

    code = "conflict"


class Cancelled(ImgSearchError):
    code = "cancelled"


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


class Unauthorized(ImgSearchError):
    """No valid API key where one is needed."""

    code = "unauthorized"


class RateLimited(ImgSearchError):
    """Over a limit (the rate, or the caller's jobs in flight); ``retry_after`` in whole seconds."""

    code = "rate_limited"

    def __init__(self, message: str, retry_after: float, code: str | None = None) -> None:
        super().__init__(message, code=code)
        self.retry_after = max(1, int(retry_after + 0.999))
