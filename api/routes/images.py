"""Post images, as ingest stored them, or as thumbnails: what a result's ``image_url`` points at.

Public (an <img> tag sends no API key) and cacheable: ETag from the bytes, Cache-Control for an hour, 304 on
If-None-Match. A taken-down post's image is gone from the blob store, so it answers 404."""

from __future__ import annotations

import hashlib
import io
from functools import partial
from typing import Annotated

import anyio
from fastapi import APIRouter, Header, Query, Request, Response

from api.schemas import ErrorResponse, check_post_id
from pipeline.errors import NotFound, Unavailable
from pipeline.layout import image_key

router = APIRouter(prefix="/v1/images", tags=["images"])
CACHE = "public, max-age=3600"


def _thumbnail(data: bytes, size: int) -> bytes:
    from PIL import Image

    from pipeline.ingest.images import shrink_to_jpeg

    with Image.open(io.BytesIO(data)) as im:
        im.draft("RGB", (size, size))
        rgb = im.convert("RGB")
    return shrink_to_jpeg(rgb, size, 82)


@router.get("/{post_id}", response_class=Response,
            responses={200: {"content": {"image/jpeg": {}}, "description": "the image (JPEG)"},
                       304: {"description": "not modified"}, 404: {"model": ErrorResponse},
                       422: {"model": ErrorResponse}, 503: {"model": ErrorResponse}})
async def image(post_id: str, request: Request,
                size: Annotated[int | None, Query(ge=16, le=1024, description="Longest side of a thumbnail, px.")] = None,
                if_none_match: Annotated[str | None, Header()] = None) -> Response:
    """The post's image (JPEG, longest side <= 1024), or a thumbnail of it with ``?size=``."""
    check_post_id(post_id)
    blobs = request.app.state.blobs
    try:
        data = await anyio.to_thread.run_sync(partial(blobs.get, image_key(post_id, "jpg")))
    except Exception as exc:  # the blob store is unreachable
        raise Unavailable(f"the image store is unreachable: {type(exc).__name__}") from exc
    if data is None:
        raise NotFound(f"no image for post {post_id!r}")
    etag = '"' + hashlib.blake2b(data + str(size).encode(), digest_size=12).hexdigest() + '"'
    headers = {"ETag": etag, "Cache-Control": CACHE}
    if if_none_match and etag in {t.strip() for t in if_none_match.split(",")}:
        return Response(status_code=304, headers=headers)
    if size is not None:
        data = await anyio.to_thread.run_sync(partial(_thumbnail, data, size))
    return Response(data, media_type="image/jpeg", headers=headers)
