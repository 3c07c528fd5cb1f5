"""The one place that builds route dependencies."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from api.service import JobService
from pipeline.settings import Settings


def _service(request: Request) -> JobService:
    return request.app.state.jobs  # type: ignore[no-any-return]


def _settings(request: Request) -> Settings:
    return request.app.state.settings  # type: ignore[no-any-return]


Jobs = Annotated[JobService, Depends(_service)]
SettingsDep = Annotated[Settings, Depends(_settings)]
