"""HTTP limits that hold before any work is done: raw query length, request body size, the replica's queue."""

from __future__ import annotations

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from pydantic import ValidationError

from hlm.api import MAX_BODY_BYTES, MAX_QUERY_CHARS, BodyLimitMiddleware, EmbedRequest, SearchRequest
from hlm.deployment import AppArgs, Topology, deployment_options


@pytest.mark.parametrize("padded", [" " * MAX_QUERY_CHARS + "drill", "drill" + "\t" * MAX_QUERY_CHARS])
def test_whitespace_padding_does_not_get_past_the_query_length_limit(padded: str) -> None:
    with pytest.raises(ValidationError, match=f"at most {MAX_QUERY_CHARS} characters"):
        SearchRequest(query=padded)
    with pytest.raises(ValidationError, match=f"at most {MAX_QUERY_CHARS} characters"):
        EmbedRequest(queries=[padded])


def test_a_query_within_the_limit_is_still_stripped() -> None:
    assert SearchRequest(query="  drill  ").query == "drill"


def echo_app() -> TestClient:
    app = FastAPI()
    app.add_middleware(BodyLimitMiddleware)

    @app.post("/echo")
    async def echo(body: dict) -> dict:
        return {"keys": len(body)}

    return TestClient(app)


def test_a_body_over_the_limit_is_a_413_before_the_route_reads_it() -> None:
    client = echo_app()
    big = b'{"query": "' + b"x" * MAX_BODY_BYTES + b'"}'
    declared = client.post("/echo", content=big, headers={"content-type": "application/json"})
    streamed = client.post("/echo", content=iter([big[:1000], big[1000:]]),  # chunked: no Content-Length
                           headers={"content-type": "application/json"})
    for response in (declared, streamed):
        assert response.status_code == 413
        assert response.json() == {"detail": f"request body over {MAX_BODY_BYTES} bytes"}
    assert client.post("/echo", json={"query": "drill"}).json() == {"keys": 1}


@pytest.mark.parametrize("topology", list(Topology))
def test_every_replica_bounds_its_queue(topology: Topology) -> None:
    options = deployment_options(AppArgs(topology=topology))
    assert all(o["max_queued_requests"] == AppArgs().max_queued_requests > 0 for o in options.values())
