"""The benchmarks' asyncio load client against a tiny in-process HTTP server: bounds, statuses, percentiles; and
the load benchmark's mixed-version check."""

from __future__ import annotations

import asyncio

import pytest
from aiohttp import web

from bench.http_load import Sample, client, drive, latency_ms
from bench.load import is_mixed, problems


async def with_server(handler, body):
    """Run `body(url)` against a loopback server answering POST /v1/search with `handler`."""
    app = web.Application()
    app.router.add_post("/v1/search", handler)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]
    try:
        return await body(f"http://127.0.0.1:{port}/v1/search")
    finally:
        await runner.cleanup()


def test_drive_sends_exactly_n_requests_in_turn_and_counts_errors_by_status():
    seen: list[dict] = []
    in_flight, most = 0, 0

    async def handler(request: web.Request) -> web.Response:
        nonlocal in_flight, most
        payload = await request.json()
        seen.append(payload)
        in_flight += 1
        most = max(most, in_flight)
        await asyncio.sleep(0.01)
        in_flight -= 1
        if payload["query"] == "bad":
            return web.json_response({"detail": "nope"}, status=422)
        return web.json_response({"ads": [], "index_version": "v1", "model_version": "m"})

    async def body(url: str):
        halfway = asyncio.Event()
        async with client() as session:
            step = await drive(session, url, ["a", "b", "bad"], concurrency=4, n_requests=30, max_seconds=30,
                               k=3, halfway=halfway)
        return step, halfway.is_set()

    step, halfway_set = asyncio.run(with_server(handler, body))
    summary = step.summary()
    assert summary["requests"] == len(seen) == 30 and halfway_set
    assert sorted(p["query"] for p in seen) == sorted(["a", "b", "bad"] * 10) and {p["k"] for p in seen} == {3}
    assert summary["ok"] == 20 and summary["errors"] == 10 and summary["errors_by_status"] == {"422": 10}
    assert most <= 4 and summary["qps"] > 0
    assert all(s.body["index_version"] == "v1" for s in step.ok)


def test_drive_stops_at_max_seconds_and_reports_a_timeout_by_its_type():
    async def handler(request: web.Request) -> web.Response:
        await asyncio.sleep(0.3)
        return web.json_response({})

    async def body(url: str):
        async with client(timeout_s=0.1) as session:
            return await drive(session, url, ["a"], concurrency=2, n_requests=1000, max_seconds=0.5)

    step = asyncio.run(with_server(handler, body))
    assert 4 <= len(step.samples) <= 14 and not step.ok
    assert all(isinstance(s.status, str) and "Timeout" in s.status for s in step.samples), step.summary()


def test_latency_percentiles_in_milliseconds():
    samples = [Sample(t / 1000, 200) for t in range(1, 101)]  # 1 … 100 ms
    assert latency_ms(samples) == {"p50_ms": 50.5, "p99_ms": 99.01, "mean_ms": 50.5}
    assert latency_ms([]) == {"p50_ms": None, "p99_ms": None, "mean_ms": None}


@pytest.mark.parametrize("ads, version, mixed", [
    (["g1-ad-1", "g1-ad-2"], "v1", False),
    (["g1-ad-1", "g0-ad-2"], "v1", True),  # two generations in one response
    (["g0-ad-1", "g0-ad-2"], "v1", True),  # names v1 but answers from g0
    (["g1-ad-1"], "v-unknown", True),
])
def test_a_response_is_mixed_unless_all_its_ads_are_of_the_version_it_names(ads, version, mixed):
    body = {"ads": [{"ad_id": a, "score": 1.0} for a in ads], "index_version": version}
    assert is_mixed(body, {"v0": "g0", "v1": "g1"}) is mixed


CLEAN = {"errors": 0, "errors_by_status": {}, "any_mixed": False, "mixed_responses": 0, "unknown_versions_seen": [],
         "all_versions_seen": True}


@pytest.mark.parametrize("change, reason", [
    ({"errors": 2, "errors_by_status": {"503": 2}}, "2 failed requests"),
    ({"any_mixed": True, "mixed_responses": 1}, "1 responses mixed index versions"),
    ({"unknown_versions_seen": ["v-x"]}, "unpublished versions"),
    ({"all_versions_seen": False}, "never served"),
])
def test_the_load_benchmark_fails_on_an_error_or_a_mixed_or_missing_version(change, reason):
    assert problems(CLEAN) == []
    found = problems({**CLEAN, **change})
    assert len(found) == 1 and reason in found[0]
