"""Types shared by ingest, search, the workers and the API."""

from __future__ import annotations

from typing import Any, Literal

import numpy as np
from numpy.typing import NDArray
from pydantic import BaseModel, Field

Vector = NDArray[np.float32]
Metadata = dict[str, Any]
JobStatus = Literal["queued", "running", "done", "failed"]


class Match(BaseModel):
    """One hit of the vector store."""

    id: str
    score: float
    metadata: Metadata = Field(default_factory=dict)


class Result(BaseModel):
    """One ranked result: fused score and its parts, what a page shows of the post, and all its metadata."""

    id: str
    score: float
    itm: float | None = None
    cosine: float | None = None
    ann_score: float | None = None
    title: str | None = None
    subreddit: str | None = None
    permalink: str | None = None
    created_utc: float | None = None
    image_url: str | None = None
    metadata: Metadata = Field(default_factory=dict)
    explanation: dict[str, Any] | None = None  # with explain: true (pipeline/search/explain.py)


class SearchParams(BaseModel):
    """What a search job asks for; defaults come from settings when left out."""

    query: str
    limit: int | None = None
    offset: int = 0
    top_k: int | None = None
    rerank_k: int | None = None  # the older name of ``candidates``
    candidates: int | None = None
    rerank: bool = True
    explain: bool = False  # maps of where the reranker looked, on the top results (pipeline/search/explain.py)
    min_score: float | None = None
    filter: dict[str, Any] | None = None  # the search API's shorthands or the filter language (filters.for_search)
    namespace: str | None = None
    like: str | None = None  # a post id: search by its stored vector (the post left out of its results)
    image: str | None = None  # SHA-256 of the query image the API stored under the job (pipeline.search.image_query)
    image_url: str | None = None  # where that image came from, when it came from a URL (shown, not fetched again)

    @property
    def kind(self) -> str:
        """text, like or image: what the query is (a label on the stage metrics)."""
        return "like" if self.like else "image" if self.image else "text"


class SearchOutcome(BaseModel):
    results: list[Result]
    candidates: list[Match]
    not_reranked: list[str] = Field(default_factory=list)
    timings: dict[str, float] = Field(default_factory=dict)
    stats: dict[str, int] = Field(default_factory=dict)


class ErrorInfo(BaseModel):
    code: str
    message: str


class Job(BaseModel):
    """The job record clients poll: the public contract."""

    id: str
    status: JobStatus
    query: str
    params: dict[str, Any] = Field(default_factory=dict)
    created_at: float
    deadline_at: float | None = None
    started_at: float | None = None
    finished_at: float | None = None
    results: list[Result] | None = None
    not_reranked: list[str] | None = None
    degraded: bool | None = None  # true when some candidates kept their ANN order (rerank inputs missing)
    error: ErrorInfo | None = None
    timings: dict[str, float] | None = None
    stats: dict[str, int] | None = None
    request_id: str | None = None  # the HTTP request that made it, carried into the worker's logs
    inflight_key: str | None = None  # the caller's jobs-in-flight set, left when the job ends (not public)
    worker: str | None = None  # the worker process running it ("host:pid", its heartbeat's name; not public)
    owner: str | None = None  # the caller that made it ("key:<name>"), where keys are configured (not public)
