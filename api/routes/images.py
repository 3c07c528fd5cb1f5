"""Post images, as ingest stored them, or as thumbnails: what a result's ``image_url`` points at.

Behind the API keys when keys are configured, unless ``IMGSEARCH_PUBLIC_IMAGES`` makes them public (an <img> tag
sends no key; the page fetches them with its key otherwise), and rate-limited as every route is. Thumbnails
come in the few sizes of ``IMGSEARCH_THUMBNAIL_SIZES``, each made once and kept in the blob store beside the
image (pipeline.layout). Cacheable: ETag from the bytes, 304 on If-None-Match; a public answer (open API or
public images) for ``PUBLIC_MAX_AGE`` (60 s) only, so a CDN drops a taken-down image within a minute; a private
one (a key's, cached by that client alone) for an hour.

A takedown is final here too: it writes the post's tombstone before it deletes anything, and a thumbnail made
meanwhile is refused (tombstone before the write) or deleted again (tombstone after it), so none outlives it."""

from __future__ import annotations

import hashlib
import io
from typing import Annotated

from fastapi import APIRouter, Header, Query, Request, Response

from api.deps import AdmissionDep, ImageCaller, SettingsDep
from api.schemas import ErrorResponse
from pipeline.errors import InvalidRequest, NotFound, Unavailable
from pipeline.ids import check_post_id
from pipeline.layout import image_key, thumb_key, tombstone_key

router = APIRouter(prefix="/v1/images", tags=["images"])
PUBLIC_MAX_AGE = "max-age=60"  # shared caches (a CDN): a takedown reaches them within this
PRIVATE_MAX_AGE = "max-age=3600"  # one client's own cache


def _thumbnail(data: bytes, size: int) -> bytes:
    from PIL import Image

    from pipeline.ingest.images import shrink_to_jpeg

    with Image.open(io.BytesIO(data)) as im:
        im.draft("RGB", (size, size))
        rgb = im.convert("RGB")
    return shrink_to_jpeg(rgb, size, 82)


@router.get("/{post_id}", response_class=Response,
            responses={200: {"content": {"image/jpeg": {}}, "description": "the image (JPEG)"},
                       304: {"description": "not modified"}, 401: {"model": ErrorResponse},
                       404: {"model": ErrorResponse}, 422: {"model": ErrorResponse}, 429: {"model": ErrorResponse},
                       503: {"model": ErrorResponse}})
async def image(post_id: str, request: Request, caller: ImageCaller, admission: AdmissionDep, settings: SettingsDep,
                size: Annotated[int | None, Query(description="Longest side of a thumbnail, px: one of "
                                                            "IMGSEARCH_THUMBNAIL_SIZES (128, 256, 512).")] = None,
                if_none_match: Annotated[str | None, Header()] = None) -> Response:
    """The post's image (JPEG, longest side <= 1024), or a thumbnail of it with ``?size=``."""
    check_post_id(post_id)
    if size is not None and size not in settings.thumbnail_sizes:
        raise InvalidRequest(f"size: one of {', '.join(map(str, sorted(settings.thumbnail_sizes)))}")
    blobs, lanes = request.app.state.blobs, request.app.state.lanes

    async def get(key: str) -> bytes | None:
        try:
            return await lanes.blobs.run(blobs.get, key)  # type: ignore[no-any-return]
        except Unavailable:  # the lane is full: busy, as it says
            raise
        except Exception as exc:  # the blob store is unreachable
            raise Unavailable(f"the image store is unreachable: {type(exc).__name__}") from exc

    async def gone() -> bool:
        try:
            return await lanes.blobs.run(blobs.exists, tombstone_key(post_id))  # type: ignore[no-any-return]
        except Unavailable:
            raise
        except Exception as exc:  # noqa: BLE001 - unknown: make nothing
            raise Unavailable(f"the image store is unreachable: {type(exc).__name__}") from exc

    data = await get(thumb_key(post_id, size) if size else image_key(post_id, "jpg"))
    if data is None and size:  # made once, on the first ask, and kept
        original = await get(image_key(post_id, "jpg"))
        if original is not None and not await gone():
            await admission.limit(caller, 0.9)  # making one costs a whole token (with the 0.1 every image costs)
            data = await lanes.decode.run(_thumbnail, original, size)
            key = thumb_key(post_id, size)
            try:
                await lanes.blobs.run(blobs.put, key, data)
            except Exception:  # noqa: BLE001 - not kept this time: made again on the next ask
                pass
            if await gone():  # a takedown began while this one was made: its listing may have missed it
                await lanes.blobs.run(blobs.delete, key)
                data = None
    if data is None:
        raise NotFound(f"no image for post {post_id!r}")
    etag = '"' + hashlib.blake2b(data, digest_size=12).hexdigest() + '"'
    public = admission.open or settings.public_images
    headers = {"ETag": etag, "Cache-Control": "public, " + PUBLIC_MAX_AGE if public else "private, " + PRIVATE_MAX_AGE}
    if if_none_match and etag in {t.strip() for t in if_none_match.split(",")}:
        return Response(status_code=304, headers=headers)
    return Response(data, media_type="image/jpeg", headers=headers)
