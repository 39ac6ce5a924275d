"""The /v1/search body serialised once (the fast path) against the response model (the slow reference)."""

from __future__ import annotations

import json

import numpy as np

from hlm.api import ScoredAd, SearchResponse, search_response_json


def test_the_body_serialised_once_is_what_the_response_model_would_serialise():
    hits = [("ad-1", np.float32(0.8125)), ("ad-\u00e9\"2", 0.25), ("ad-3", np.float32(-1e-7))]
    fast = search_response_json(hits, "v1", "student@abc")
    reference = SearchResponse(ads=[ScoredAd(ad_id=a, score=s) for a, s in hits], index_version="v1",
                               model_version="student@abc")
    assert SearchResponse.model_validate_json(fast) == reference
    assert json.loads(fast) == json.loads(reference.model_dump_json())
