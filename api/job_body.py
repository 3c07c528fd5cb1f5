"""The body of ``POST /v1/jobs``: JSON (a text query, ``like`` or ``image_url``) or multipart/form-data (an
uploaded picture in the ``image`` part, the other options as JSON in an ``options`` part).

One route takes both, so the body is read here rather than by FastAPI's declared-body parsing (which takes one
content type); the JSON path validates with the same model and answers the same 422s. A picture (uploaded or
fetched) is checked here, before admission, with ingest's guards (``pipeline.search.image_query``: Pillow alone, off
the event loop, in the API's own thread lanes: ``api.lanes``), so a bomb, a truncated file or HTML gets its
4xx at once and no worker ever sees it."""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException

from api.contract import params_of
from api.lanes import Lanes
from api.schemas import JobRequest
from pipeline.errors import InvalidRequest
from pipeline.search import image_query
from pipeline.search.image_query import QueryImage
from pipeline.settings import ApiSettings

MULTIPART = "multipart/form-data"
FORM_SLACK = 64 << 10  # room in a multipart body for its boundaries, headers and options beside the picture


@dataclass
class Submission:
    query: str
    params: dict[str, Any]
    image: QueryImage | None = None
    job_id: str = field(default_factory=lambda: uuid.uuid4().hex)


def is_upload(content_type: str) -> bool:
    return content_type.split(";", 1)[0].strip().lower() == MULTIPART


async def read(request: Request, picture_toll: Callable[[], Awaitable[None]]) -> Submission:
    """The submission in the request's body, checked; RequestValidationError or InvalidRequest (422) if not.
    A picture (an upload or an image_url) pays ``picture_toll`` (a rate-limit token, 429 past it) before it is
    read, fetched or decoded: a caller over its limit costs no download and no decode."""
    settings: ApiSettings = request.app.state.settings
    if is_upload(request.headers.get("content-type", "")):
        await picture_toll()
        return await _upload(request, settings)
    req = _validated(await request.body())
    if req.query is None and req.like is None and req.image_url is None:
        raise InvalidRequest("body: give a query (words), like (a post id) or image_url; or upload an image "
                             "as multipart/form-data")
    _, params = params_of(req)  # the options as the text route takes them
    if req.image_url is None:
        return Submission(req.query or "", params)
    await picture_toll()
    lanes: Lanes = request.app.state.lanes
    data = await lanes.fetch.run(image_query.fetch, req.image_url, settings)  # its own lane: never a thread others need
    return await _with_image(data, params, request)


async def _upload(request: Request, settings: ApiSettings) -> Submission:
    try:
        form = await request.form(max_files=1, max_fields=2, max_part_size=FORM_SLACK)
    except HTTPException as exc:  # Starlette's answer to a malformed form
        if exc.status_code == 413:  # over the upload cap (api.limits): answered as such
            raise
        raise InvalidRequest(f"the multipart body could not be read: {exc.detail}") from None
    try:
        unknown = sorted(set(form.keys()) - {"image", "options"})
        if unknown:
            raise InvalidRequest(f"multipart: unknown part(s) {', '.join(map(ascii, unknown))}; send 'image' (the "
                                 "picture) and optionally 'options' (JSON)")
        picture = form.get("image")
        if not isinstance(picture, UploadFile):
            raise InvalidRequest("multipart: an 'image' part holding the picture (a file) is required")
        options = form.get("options") or "{}"
        if not isinstance(options, str):
            raise InvalidRequest("multipart: 'options' is JSON text, not a file")
        req = _validated(options.encode())
        try:
            req.image_options()
        except ValueError as exc:
            raise InvalidRequest(f"options: {exc}") from None
        data = await picture.read(settings.limits.max_upload_bytes + 1)
    finally:
        await form.close()
    return await _with_image(data, params_of(req)[1], request)


async def _with_image(data: bytes, params: dict[str, Any], request: Request) -> Submission:
    """The picture checked and normalised in the decode lane: at most ``image_decode_threads`` decodes at once,
    each within ``image_query_decode_mib`` (the API's memory bounds them, not the number of callers)."""
    lanes: Lanes = request.app.state.lanes
    image = await lanes.decode.run(image_query.check, data, request.app.state.settings)
    return Submission("", {**params, "image": image.sha256}, image)


def _validated(raw: bytes) -> JobRequest:
    try:
        return JobRequest.model_validate_json(raw)
    except ValidationError as exc:
        raise RequestValidationError(exc.errors(include_url=False)) from None
