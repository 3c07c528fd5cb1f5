"""The blob store's layout, in one place: where a post's image, its metadata and its BLIP vision features live.
Ingest writes these keys, search and the image route read them, takedown deletes them. Features are keyed by
the reranker's version, so a model change never mixes features of two models."""

from __future__ import annotations


def feature_key(reranker_version: str, post_id: str) -> str:
    return f"features/{reranker_version}/{post_id}"


def image_key(post_id: str, ext: str) -> str:
    return f"images/{post_id}.{ext}"


def post_key(post_id: str) -> str:
    return f"posts/{post_id}.json"
