"""The blob store's layout, in one place: where a post's image, its thumbnails, its metadata and its BLIP vision
features live. Ingest writes these keys (the image route its thumbnails), search and the image route read them,
takedown deletes them. Features are keyed by the reranker's version, so a model change never mixes features of
two models."""

from __future__ import annotations


def feature_key(reranker_version: str, post_id: str) -> str:
    return f"features/{reranker_version}/{post_id}"


def image_key(post_id: str, ext: str) -> str:
    return f"images/{post_id}.{ext}"


def thumb_key(post_id: str, size: int) -> str:
    """A thumbnail of the post's image, longest side ``size`` px (JPEG), made by the image route on first ask."""
    return f"thumbs/{size}/{post_id}.jpg"


def post_key(post_id: str) -> str:
    return f"posts/{post_id}.json"
