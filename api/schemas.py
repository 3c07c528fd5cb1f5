"""Request and response models: the public contract, with examples for the OpenAPI page."""

from __future__ import annotations

import math
import re
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, StrictStr, field_validator, model_validator
from pydantic.json_schema import SkipJsonSchema

from pipeline.ids import POST_ID_RULE, is_post_id
from pipeline.types import Job


class SearchRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, json_schema_extra={"examples": [
        {"query": "a surprised pikachu face"},
        {"query": "a cat looking at a computer", "limit": 10, "offset": 10, "min_score": 0.2,
         "filter": {"subreddit": ["memes", "me_irl"], "created_after": 1735689600, "min_post_score": 1000}},
        {"query": "a red car", "rerank": False, "filter": {"over_18": None, "score": {"$gte": 50}}}]})

    query: StrictStr = Field(description="What the image shows, in words (1 to 512 characters).")
    limit: int | None = Field(None, ge=1, le=100, description="How many results to return (default 32).")
    offset: int = Field(0, ge=0, le=900, description="How many of the best results to skip (paging).")
    top_k: int | None = Field(None, ge=1, le=1000, description="How many candidates to retrieve (at least offset + limit).")
    candidates: int | None = Field(None, ge=0, le=128, description="How many of them BLIP reranks (default 32).")
    rerank_k: int | None = Field(None, ge=0, le=128, description="The older name of `candidates`.")
    rerank: bool = Field(True, description="false: the vector store's order and scores, no BLIP rerank.")
    min_score: float | None = Field(None, description="Leave out results scoring below this.")
    deadline_s: float | None = Field(None, ge=1, le=3600, description="Seconds the job may take, queue wait "
                                     "included (at least 1); capped by the server's IMGSEARCH_JOB_DEADLINE_S (60 s).")
    filter: dict[str, Any] | None = Field(
        None, description="Shorthands: `subreddit` (a name or a list), `over_18` (true, false, or null for both; "
                          "NSFW posts are left out unless the filter names over_18), `created_after` / "
                          "`created_before` (unix seconds), `min_post_score`. Any other key is Pinecone's filter "
                          "language (`$eq $ne $in $nin $gt $gte $lt $lte $and $or`) on the post's metadata.")

    @model_validator(mode="before")
    @classmethod
    def _finite(cls, body: Any) -> Any:
        """No ``NaN``, ``Infinity`` or ``-Infinity`` anywhere (Python's JSON decoder takes those literals, which JSON
        has not got): refused here, once for every edge, the filter's values included."""
        todo = [body]
        while todo:
            v = todo.pop()
            if isinstance(v, float) and not math.isfinite(v):
                raise ValueError("NaN and Infinity are not JSON numbers")
            if isinstance(v, dict):
                todo.extend(v.values())
            elif isinstance(v, list):
                todo.extend(v)
        return body

    @field_validator("query")
    @classmethod
    def _non_blank(cls, v: str) -> str:
        return clean_query(v)


def clean_query(v: str) -> str:
    """A query as typed: no control characters, not blank, valid Unicode; stripped."""
    if _CONTROL.search(v):  # NUL, escape sequences and the like: no one types them into a search box
        raise ValueError("the query holds control characters (only tab and line breaks are allowed)")
    v = v.strip()
    if not v:
        raise ValueError("the query is empty")
    try:
        v.encode("utf-8")
    except UnicodeEncodeError:  # lone surrogates from a JSON \ud800 escape: no text a model can read
        raise ValueError("the query is not valid Unicode text") from None
    return v


class JobRequest(SearchRequest):
    """``POST /v1/jobs``'s JSON body: a text query, or a search by image: ``like`` (a stored post) or
    ``image_url`` (a picture fetched under ingest's rules). An uploaded picture comes as multipart/form-data
    instead (api.job_body)."""

    model_config = ConfigDict(extra="forbid", strict=True, json_schema_extra={"examples": [
        {"query": "a surprised pikachu face"}, {"like": "1abcde", "limit": 10},
        {"image_url": "https://i.redd.it/abc123.png", "filter": {"subreddit": "memes"}}]})

    # optional here, required by POST /search (words only): a wider field than the parent's, on purpose
    query: StrictStr | None = Field(  # type: ignore[assignment]
        None, description="What the image shows, in words (1 to 512 characters).")
    like: StrictStr | None = Field(None, description="A post id: posts whose images look like that post's (it is "
                                   "left out of its own results).")
    image_url: StrictStr | None = Field(None, max_length=2048, description="An image to search by, fetched from "
                                        "an allowed image host (IMGSEARCH_REDDIT_IMAGE_HOSTS).")
    explain: bool = Field(False, description="Each of the top 10 results carries `explanation`: where the reranker "
                          "looked for the words ({grid, layer, method}); for an image query, why there is none. "
                          "Also afterwards: GET /v1/jobs/{id}/explain/{post_id}.")

    @field_validator("query")
    @classmethod
    def _non_blank(cls, v: str | None) -> str | None:  # type: ignore[override]
        return None if v is None else clean_query(v)

    @field_validator("like")
    @classmethod
    def _post_id(cls, v: str | None) -> str | None:
        if v is not None and not is_post_id(v):
            raise ValueError(POST_ID_RULE)
        return v

    @model_validator(mode="after")
    def _one_query(self) -> JobRequest:
        given = [k for k in ("query", "like", "image_url") if getattr(self, k) is not None]
        if len(given) > 1:
            raise ValueError(f"one query at a time: {' and '.join(given)} were both given")
        return self

    def image_options(self) -> JobRequest:
        """The same body as an upload's options: no query of its own (the picture is the query)."""
        if self.query is not None or self.like is not None or self.image_url is not None:
            raise ValueError("an uploaded image is the query: options take no query, like or image_url")
        return self


_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")  # C0 and C1 controls but tab, LF, CR


class JobLinks(BaseModel):
    self: str
    events: str


class JobAccepted(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [{
        "id": "3f2a9c0d4b7e4e0f9a51c2d8e6b1a7c4", "status": "queued",
        "links": {"self": "/v1/jobs/3f2a9c0d4b7e4e0f9a51c2d8e6b1a7c4",
                  "events": "/v1/jobs/3f2a9c0d4b7e4e0f9a51c2d8e6b1a7c4/events"}}]})

    id: str
    status: str
    links: JobLinks


class ErrorBody(BaseModel):
    code: str
    message: str


class ErrorResponse(BaseModel):
    error: ErrorBody


class LegacySearchResponse(BaseModel):
    """The original service's shape: ``[post_id, score]`` pairs, best first."""

    results: list[Annotated[list[str | float], Field(min_length=2, max_length=2)]] = Field(
        description="[post_id, score] pairs", examples=[[["1abcde", 0.8123], ["1fghij", 0.7344]]])


class JobView(Job):
    """A job as ``GET /v1/jobs/{id}`` shows it: the record, less what only the workers use."""

    model_config = ConfigDict(json_schema_extra={"examples": [{
        "id": "3f2a9c0d4b7e4e0f9a51c2d8e6b1a7c4", "status": "done", "query": "a surprised pikachu face",
        "params": {"limit": 2}, "created_at": 1764180000.12, "deadline_at": 1764180060.12,
        "started_at": 1764180000.13, "finished_at": 1764180000.41, "request_id": "8c1e0c0f2d3b4a59b1c0f3e2d1a4b5c6",
        "results": [{"id": "1abcde", "score": 0.8123, "itm": 0.91, "cosine": 0.58, "ann_score": 0.17,
                     "title": "when the code works first try", "subreddit": "memes",
                     "permalink": "https://www.reddit.com/r/memes/comments/1abcde/", "created_utc": 1764100000.0,
                     "image_url": "/v1/images/1abcde", "metadata": {"score": 15321, "over_18": False}}],
        "not_reranked": [], "timings": {"encode": 21.3, "retrieve": 3.9, "fetch": 9.8, "rerank": 1890.1,
                                        "fuse": 0.1, "total": 1925.2, "queue_wait": 4.2},
        "stats": {"features_local": 0, "features_blob": 32}}]})

    inflight_key: SkipJsonSchema[str | None] = Field(None, exclude=True)
    worker: SkipJsonSchema[str | None] = Field(None, exclude=True)
    owner: SkipJsonSchema[str | None] = Field(None, exclude=True)
