"""The one place that builds route dependencies: the job store, admission, settings, and who is calling."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from api import auth
from pipeline.admission.admit import Admission
from pipeline.admission.callers import Caller
from pipeline.jobs.store import AsyncJobStore
from pipeline.settings import ApiSettings


async def _jobs(request: Request) -> AsyncJobStore:
    return request.app.state.jobs  # type: ignore[no-any-return]


# Dependencies are coroutines, even where nothing awaits: FastAPI runs a plain function in its thread pool, a
# thread hop per dependency and request (bench.admission)
def _app_settings(request: Request) -> ApiSettings:
    return request.app.state.settings  # type: ignore[no-any-return]


def _app_admission(request: Request) -> Admission:
    return request.app.state.admission  # type: ignore[no-any-return]


async def _settings(request: Request) -> ApiSettings:
    return _app_settings(request)


async def _admission(request: Request) -> Admission:
    return _app_admission(request)


async def _caller(request: Request) -> Caller:
    """The caller, authenticated when API keys are configured (401 otherwise)."""
    caller = auth.caller(_app_admission(request), request)
    request.state.caller = caller
    return caller


async def _image_caller(request: Request) -> Caller:
    """The caller of an image route, within its rate limit: keyed as any route's while keys are configured,
    unless ``public_images`` lets callers without a key in (by address); 401 or 429 otherwise. A cached image
    costs a tenth of a token (a page shows dozens at once), a thumbnail made on demand a whole one."""
    admission = _app_admission(request)
    caller = admission.caller(auth.token(request), auth.client_ip(admission, request),
                              public=_app_settings(request).public_images)
    request.state.caller = caller
    await admission.limit(caller, 0.1)
    return caller


async def _limited(request: Request, caller: Annotated[Caller, Depends(_caller)]) -> Caller:
    """The caller, within its rate limit (429 with Retry-After otherwise)."""
    await _app_admission(request).limit(caller)
    return caller


# reading or cancelling a job: a client polls, so a tenth of a token (ten polls a second for the whole burst, yet
# no one reads Redis for free)
POLL_COST = 0.1


async def _polled(request: Request, caller: Annotated[Caller, Depends(_caller)]) -> Caller:
    """The caller, within its rate limit at ``POLL_COST`` (429 with Retry-After otherwise)."""
    await _app_admission(request).limit(caller, POLL_COST)
    return caller


async def _admin(request: Request, caller: Annotated[Caller, Depends(_caller)]) -> Caller:
    _app_admission(request).check_admin(caller)
    await _app_admission(request).limit(caller)
    return caller


Jobs = Annotated[AsyncJobStore, Depends(_jobs)]
SettingsDep = Annotated[ApiSettings, Depends(_settings)]
AdmissionDep = Annotated[Admission, Depends(_admission)]
CallerDep = Annotated[Caller, Depends(_caller)]
LimitedCaller = Annotated[Caller, Depends(_limited)]
PolledCaller = Annotated[Caller, Depends(_polled)]
AdminCaller = Annotated[Caller, Depends(_admin)]
ImageCaller = Annotated[Caller, Depends(_image_caller)]
