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
    """A thumbnail of the post's image, longest side ``size`` px (JPEG), made by the image route on first ask. Every
    size of a post sits under ``thumbs_prefix``, so a takedown finds the sizes an API with other settings made."""
    return f"{thumbs_prefix(post_id)}{size}.jpg"


def thumbs_prefix(post_id: str) -> str:
    return f"thumbs/{post_id}/"


def old_thumb_key(post_id: str, size: int) -> str:
    """Where thumbnails were kept before they moved under the post's own folder: a takedown deletes these too."""
    return f"thumbs/{size}/{post_id}.jpg"


def tombstone_key(post_id: str) -> str:
    """Written by a takedown before it deletes anything, and never removed (a takedown is final): a thumbnail made
    while the takedown runs is refused, or deleted again by its writer when it finds this after writing."""
    return f"gone/{post_id}"


def post_key(post_id: str) -> str:
    return f"posts/{post_id}.json"
