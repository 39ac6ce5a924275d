"""End-to-end `POST /v1/search` on Ray Serve, student vs teacher deployed the same way, and Serve's overhead over a
direct in-process encode + search with the same encoder and index: one run, side by side.

Each model gets a Flat index of its own embeddings of the built-in catalogue's ads, published through `hlm.store` to
a project-owned redis-server. Both apps are `serving.app` with one replica per deployment and the same batching, on
one local Ray, and driven on loopback by an asyncio client (`bench.http_load`) at 1, 8 and 32 concurrent clients,
alternating student and teacher at each concurrency so both see the same machine load. The direct call runs one
query at a time with one torch and one FAISS thread, as the replicas get (num_cpus=1 → OMP_NUM_THREADS=1), taken in
turn with one `POST /v1/search` of the same text (`bench.common.interleaved_timings`): their ratio is Serve's cost
(HTTP, proxy, handles, batching), not a thread count or a swing in the machine's load.
"""

from __future__ import annotations

import asyncio
import logging
import tempfile
import time
from pathlib import Path

import numpy as np
import requests

from bench.common import interleaved_timings, local_redis, ms_percentiles, realistic_queries, threads, write_result
from bench.http_load import auth_headers, client, deploy, drive, serve_on_local_ray
from hlm.catalog import generate_catalog
from hlm.encoder import Encoder
from hlm.index import AdIndex
from hlm.store import IndexStore, redis_client

logger = logging.getLogger(__name__)

MODELS = {"student": "student-default", "teacher": "teacher-default"}
K = 10
APP_ARGS = {"min_replicas": 1, "max_replicas": 1, "max_batch_size": 32, "batch_wait_timeout_s": 0.005, "poll_s": 2.0}


def direct_vs_serve(url: str, encoder: Encoder, index: AdIndex, queries: list[str]) -> dict[str, np.ndarray]:
    """Seconds per query of `index.search_ids(encoder.encode([q]), K)` in this process and of `POST /v1/search`
    for the same `q`, taken in turn query by query (`interleaved_timings`) so both see the same machine load."""
    with threads(1), requests.Session() as http:
        http.headers.update(auth_headers())
        return interleaved_timings({
            "direct": lambda q: index.search_ids(encoder.encode([q]), K),  # (1, d) -> K ids
            "serve": lambda q: http.post(url, json={"query": q, "k": K}, timeout=60).raise_for_status(),
        }, queries)


async def concurrent_steps(base_url: str, roles: list[str], queries: list[str], concurrencies: tuple[int, ...],
                           n_requests: dict[int, int], max_seconds: float) -> dict:
    """Flat numbers per role and concurrency; the roles alternate at each concurrency so they share the load."""
    numbers: dict = {}
    async with client(headers=auth_headers()) as session:
        for role in roles:  # warm-up, not counted
            await drive(session, f"{base_url}/{role}/v1/search", queries, concurrency=4, n_requests=8, max_seconds=120)
        for c in concurrencies:
            for role in roles:
                step = await drive(session, f"{base_url}/{role}/v1/search", queries, concurrency=c,
                                   n_requests=n_requests[c], max_seconds=max_seconds, k=K)
                numbers |= {f"{role}_c{c}_{key}": value for key, value in step.summary().items()
                            if key in ("p50_ms", "p99_ms", "qps", "errors")}
    return numbers


def run(out_dir: Path, *, quick: bool = False) -> dict:
    n_ads, concurrencies, n_direct, max_seconds = (64, (1, 8), 20, 10.0) if quick else (500, (1, 8, 32), 100, 30.0)
    n_requests = {c: max(16, 4 * c) if quick else max(100, 12 * c) for c in concurrencies}
    started = time.perf_counter()
    queries, query_source = realistic_queries(max(n_direct, 400))
    ads = generate_catalog(n_ads=n_ads, n_queries=0).ads
    ad_ids, ad_texts = ads.column("ad_id").to_pylist(), ads.column("text").to_pylist()
    with tempfile.TemporaryDirectory() as tmp, local_redis(Path(tmp) / "redis") as redis_url:
        # 1. Per model: embed the ads and publish the index; both stay here for the direct calls.
        models = {}
        for role, model in MODELS.items():
            encoder = Encoder.load(model)
            index = AdIndex.build(ad_ids, encoder.encode(ad_texts, kind="ad"), encoder.space, "Flat")  # (N, d)
            IndexStore(redis_client(redis_url), f"bench-{role}").publish(index, source="bench.serving")
            models[role] = (encoder, index)
        # 2. Both apps on one Ray, deployed the same way.
        with serve_on_local_ray(num_cpus=4) as base_url:
            for role, model in MODELS.items():
                deploy(role, f"/{role}", {**APP_ARGS, "student": {"model": model}, "index": f"bench-{role}",
                                          "redis_url": redis_url})
            numbers = {}
            for role, (encoder, index) in models.items():
                seconds = direct_vs_serve(f"{base_url}/{role}/v1/search", encoder, index, queries[:n_direct])
                direct, served = ms_percentiles(seconds["direct"]), ms_percentiles(seconds["serve"])
                numbers |= {f"{role}_direct_p50_ms": direct["p50_ms"], f"{role}_direct_p99_ms": direct["p99_ms"],
                            f"{role}_paired_serve_p50_ms": served["p50_ms"]}
            numbers |= asyncio.run(concurrent_steps(base_url, list(models), queries, concurrencies, n_requests,
                                                    max_seconds))
    # 3. Ratios, side by side from this one run.
    top = max(concurrencies)
    for role in MODELS:
        served, direct = numbers[f"{role}_paired_serve_p50_ms"], numbers[f"{role}_direct_p50_ms"]
        numbers[f"{role}_serve_over_direct_p50"] = _ratio(served, direct)
        numbers[f"{role}_serve_overhead_p50_ms"] = round(served - direct, 2) if served and direct else None
    numbers["teacher_over_student_p50_c1"] = _ratio(numbers["teacher_c1_p50_ms"], numbers["student_c1_p50_ms"])
    numbers[f"student_over_teacher_qps_c{top}"] = _ratio(numbers[f"student_c{top}_qps"], numbers[f"teacher_c{top}_qps"])
    numbers["wall_s"] = round(time.perf_counter() - started, 1)
    config = {"models": MODELS, "n_ads": n_ads, "factory": "Flat", "k": K, "app_args": APP_ARGS,
              "concurrency": list(concurrencies), "requests_per_step": n_requests, "max_seconds_per_step": max_seconds,
              "direct_vs_serve_pairs": n_direct, "direct_threads": 1, "queries": query_source, "quick": quick}
    path = write_result(out_dir, "serving", config, numbers)
    logger.info("serving benchmark: %s -> %s", numbers, path)
    return numbers


def _ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 3) if a and b else None
