"""The HTTP contract of the serving API: request and response models, validated before any work is done.

Bad input (empty or over-long query, k out of range, wrong JSON) fails validation and becomes a 4xx
with a message that names the field; it never reaches the encoder or the index.
"""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, StringConstraints

MAX_QUERY_CHARS = 512
MAX_K = 1000
MAX_EMBED_BATCH = 256

QueryText = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=MAX_QUERY_CHARS)]


class SearchRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    query: QueryText
    k: int = Field(10, ge=1, le=MAX_K, description="number of ads to return")


class ScoredAd(BaseModel):
    ad_id: str
    score: float


class SearchResponse(BaseModel):
    ads: list[ScoredAd]
    index_version: str
    model_version: str


class EmbedRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    queries: list[QueryText] = Field(..., min_length=1, max_length=MAX_EMBED_BATCH)


class EmbedResponse(BaseModel):
    embeddings: list[list[float]]
    dim: int
    space: str
    model_version: str
