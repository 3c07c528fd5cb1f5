"""Request and response models: the public contract, with examples for the OpenAPI page."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, StrictStr, field_validator


class SearchRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [{"query": "a surprised pikachu face"}]})

    query: StrictStr = Field(description="What the image shows, in words (1 to 512 characters).")
    limit: int | None = Field(None, ge=1, le=100, description="How many results to return.")
    top_k: int | None = Field(None, ge=1, le=1000, description="How many candidates to retrieve.")
    rerank_k: int | None = Field(None, ge=0, le=128, description="How many of them BLIP reranks.")
    filter: dict[str, Any] | None = Field(None, description="Pinecone-style metadata filter.")

    @field_validator("query")
    @classmethod
    def _non_blank(cls, v: str) -> str:
        v = v.strip()
        if not v:
            raise ValueError("the query is empty")
        return v


class JobLinks(BaseModel):
    self: str
    events: str


class JobAccepted(BaseModel):
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

    results: list[tuple[str, float]]
