"""Who is calling: the API key from the request's headers and the client's address (X-Forwarded-For believed
only from a trusted proxy), handed to admission, which knows the keys (pipeline.admission)."""

from __future__ import annotations

from starlette.requests import Request

from pipeline.admission.addresses import client_address
from pipeline.admission.admit import Admission
from pipeline.admission.callers import Caller


def key_of(authorization: str | None, api_key: str | None) -> str | None:
    """The key from ``Authorization: Bearer <key>`` or else ``X-API-Key: <key>`` (every edge reads it so)."""
    auth = authorization or ""
    return auth[7:].strip() if auth.lower().startswith("bearer ") else api_key


def token(request: Request) -> str | None:
    return key_of(request.headers.get("authorization"), request.headers.get("x-api-key"))


def client_ip(admission: Admission, request: Request) -> str:
    peer = request.client.host if request.client else "unknown"
    return client_address(peer, request.headers.getlist("x-forwarded-for"), admission.trusted)


def caller(admission: Admission, request: Request) -> Caller:
    """The caller, authenticated when API keys are configured (Unauthorized otherwise)."""
    return admission.caller(token(request), client_ip(admission, request))
