"""The one place that builds route dependencies: the job service, settings, and who is calling."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from api.security import Caller, Guard
from api.service import JobService
from pipeline.settings import Settings


def _service(request: Request) -> JobService:
    return request.app.state.jobs  # type: ignore[no-any-return]


def _settings(request: Request) -> Settings:
    return request.app.state.settings  # type: ignore[no-any-return]


def _guard(request: Request) -> Guard:
    return request.app.state.guard  # type: ignore[no-any-return]


async def _caller(request: Request) -> Caller:
    """The caller, authenticated when API keys are configured (401 otherwise)."""
    caller = _guard(request).caller(request)
    request.state.caller = caller
    return caller


async def _limited(request: Request, caller: Annotated[Caller, Depends(_caller)]) -> Caller:
    """The caller, within its rate limit (429 with Retry-After otherwise)."""
    await _guard(request).limit(caller)
    return caller


async def _admin(request: Request, caller: Annotated[Caller, Depends(_caller)]) -> Caller:
    _guard(request).admin(caller)
    await _guard(request).limit(caller)
    return caller


Jobs = Annotated[JobService, Depends(_service)]
SettingsDep = Annotated[Settings, Depends(_settings)]
GuardDep = Annotated[Guard, Depends(_guard)]
CallerDep = Annotated[Caller, Depends(_caller)]
LimitedCaller = Annotated[Caller, Depends(_limited)]
AdminCaller = Annotated[Caller, Depends(_admin)]
