"""End-to-end `POST /v1/search` on Ray Serve against the same encoder and index called in this process: Serve's
overhead at one client, and its loaded throughput against in-process batched encode + search on the same cores.

Each model (student, teacher) gets a Flat index of its own embeddings of the built-in catalogue's ads, published
through `hlm.store` to a project-owned redis-server, and is served by `serving.app` with one replica (its
defaults otherwise), deployed alone while it is measured (no idle app beside it) and driven on loopback by an
asyncio client (`bench.http_load`). Ray's processes and the in-process reference run on the same cores; the load
generator runs on a core of its own (`split_cores`), so it never takes the replicas' CPU.

* Overhead: one query at a time in this process (one torch and one FAISS thread, as the replica gets) taken in
  turn with one `POST /v1/search` of the same text (`bench.common.interleaved_timings`): their ratio is Serve's cost
  (HTTP, proxy, routing), not a thread count or a swing in the machine's load.
* Throughput: q/s of in-process `encode` + `search` at batch `max_batch_size` (the most the replica can batch)
  on the same cores, measured before and after the HTTP steps (their mean), against Serve's q/s at 32 and 64
  clients.
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
from bench.http_load import auth_headers, client, deploy, drive, on_cores, serve_mode, serve_on_local_ray, split_cores
from hlm.catalog import generate_catalog
from hlm.encoder import Encoder
from hlm.index import AdIndex
from hlm.redis_client import redis_client
from hlm.store import IndexStore

logger = logging.getLogger(__name__)

MODELS = {"student": "student-default", "teacher": "teacher-default"}
K = 10
BATCH = 32  # the app's default max_batch_size: the in-process reference runs at the batch the replica may form
APP_ARGS = {"min_replicas": 1, "max_replicas": 1, "max_batch_size": BATCH, "poll_s": 2.0}


def direct_vs_serve(url: str, encoder: Encoder, index: AdIndex, queries: list[str]) -> dict[str, np.ndarray]:
    """Seconds per query of `index.search_ids(encoder.encode([q]), K)` in this process and of `POST /v1/search`
    for the same `q`, taken in turn query by query. One request at a time: the client waits while Serve works, so
    it may share Serve's cores here."""
    with threads(1), requests.Session() as http:
        http.headers.update(auth_headers())
        return interleaved_timings({
            "direct": lambda q: index.search_ids(encoder.encode([q]), K),  # (1, d) -> K ids
            "serve": lambda q: http.post(url, json={"query": q, "k": K}, timeout=60).raise_for_status(),
        }, queries)


def batched_direct_qps(encoder: Encoder, index: AdIndex, queries: list[str], n_batches: int) -> float:
    """Queries per second of in-process encode + search at batch BATCH, one thread."""
    batches = [[queries[(i * BATCH + j) % len(queries)] for j in range(BATCH)] for i in range(n_batches)]
    with threads(1):
        index.search_ids(encoder.encode(batches[0]), K)  # warm-up
        started = time.perf_counter()
        for batch in batches:
            index.search_ids(encoder.encode(batch), K)  # (B, d) -> B lists
        return len(batches) * BATCH / (time.perf_counter() - started)


async def concurrent_steps(url: str, queries: list[str], concurrencies: tuple[int, ...], n_requests: dict[int, int],
                           max_seconds: float) -> dict:
    numbers: dict = {}
    async with client(headers=auth_headers()) as session:
        await drive(session, url, queries, concurrency=4, n_requests=8, max_seconds=120)  # warm-up, not counted
        for c in concurrencies:
            step = await drive(session, url, queries, concurrency=c, n_requests=n_requests[c], max_seconds=max_seconds,
                               k=K)
            numbers |= {f"c{c}_{key}": value for key, value in step.summary().items()
                        if key in ("p50_ms", "p99_ms", "qps", "errors")}
    return numbers


def measure(role: str, base_url: str, encoder: Encoder, index: AdIndex, queries: list[str], *, cores, client_cores,
            n_direct: int, n_batches: int, concurrencies: tuple[int, ...], n_requests: dict[int, int],
            max_seconds: float) -> dict:
    url = f"{base_url}/{role}/v1/search"
    with on_cores(cores):  # the replicas' cores
        seconds = direct_vs_serve(url, encoder, index, queries[:n_direct])
        before = batched_direct_qps(encoder, index, queries, n_batches)
    with on_cores(client_cores):
        steps = asyncio.run(concurrent_steps(url, queries, concurrencies, n_requests, max_seconds))
    with on_cores(cores):
        after = batched_direct_qps(encoder, index, queries, n_batches)
    batches = requests.get(f"{base_url}/{role}/v1/index", headers=auth_headers(), timeout=30).json().get("batches")
    direct, served = ms_percentiles(seconds["direct"]), ms_percentiles(seconds["serve"])
    numbers = {"direct_p50_ms": direct["p50_ms"], "direct_p99_ms": direct["p99_ms"],
               "paired_serve_p50_ms": served["p50_ms"], "paired_serve_p99_ms": served["p99_ms"],
               "serve_over_direct_p50": _ratio(served["p50_ms"], direct["p50_ms"]),
               "serve_overhead_p50_ms": round(served["p50_ms"] - direct["p50_ms"], 2),
               "batched_direct_qps": round((before + after) / 2, 1), **steps,
               "mean_batch_size": batches["mean_size"] if batches else None}
    for c in concurrencies:
        numbers[f"c{c}_qps_over_batched_direct"] = _ratio(numbers[f"c{c}_qps"], numbers["batched_direct_qps"])
    return {f"{role}_{key}": value for key, value in numbers.items()}


def run(out_dir: Path, *, quick: bool = False) -> dict:
    n_ads, n_direct, n_batches, max_seconds = (64, 20, 2, 10.0) if quick else (500, 100, 8, 30.0)
    concurrencies = {"student": (1, 8) if quick else (1, 8, 32, 64), "teacher": (1, 8)}
    n_requests = {c: max(16, 4 * c) if quick else max(100, 12 * c) for c in (1, 8, 32, 64)}
    started = time.perf_counter()
    queries, query_source = realistic_queries(max(n_direct, 400))
    ads = generate_catalog(n_ads=n_ads, n_queries=0).ads
    ad_ids, ad_texts = ads.column("ad_id").to_pylist(), ads.column("text").to_pylist()
    cores, client_cores = split_cores()
    numbers: dict = {}
    # ignore_cleanup_errors: redis-server may still write its dump file after kill returns
    with tempfile.TemporaryDirectory(ignore_cleanup_errors=True) as tmp, \
            local_redis(Path(tmp) / "redis") as redis_url, serve_on_local_ray(num_cpus=4, cores=cores) as base_url:
        for role, model in MODELS.items():
            encoder = Encoder.load(model)
            index = AdIndex.build(ad_ids, encoder.encode(ad_texts, kind="ad"), encoder.space, "Flat")  # (N, d)
            IndexStore(redis_client(redis_url), f"bench-{role}").publish(index, source="bench.serving")
            deploy(role, f"/{role}", {**APP_ARGS, "student": {"model": model}, "index": f"bench-{role}",
                                      "redis_url": redis_url})
            numbers |= measure(role, base_url, encoder, index, queries, cores=cores, client_cores=client_cores,
                               n_direct=n_direct, n_batches=n_batches, concurrencies=concurrencies[role],
                               n_requests=n_requests, max_seconds=max_seconds)
            _delete(role)  # measured alone: an idle app must not share the cores with the next one
    numbers["teacher_over_student_p50_c1"] = _ratio(numbers["teacher_c1_p50_ms"], numbers["student_c1_p50_ms"])
    numbers["student_over_teacher_qps_c8"] = _ratio(numbers["student_c8_qps"], numbers["teacher_c8_qps"])
    numbers["wall_s"] = round(time.perf_counter() - started, 1)
    config = {"models": MODELS, "n_ads": n_ads, "factory": "Flat", "k": K, "app_args": APP_ARGS,
              "concurrency": concurrencies, "requests_per_step": n_requests, "max_seconds_per_step": max_seconds,
              "direct_vs_serve_pairs": n_direct, "direct_threads": 1, "batched_direct": f"{n_batches} x {BATCH}",
              "ray_cores": sorted(cores) if cores else None, "client_cores": sorted(client_cores) if cores else None,
              "queries": query_source, "quick": quick, "serve_mode": serve_mode()}
    path = write_result(out_dir, "serving", config, numbers)
    logger.info("serving benchmark: %s -> %s", numbers, path)
    return numbers


def _delete(name: str) -> None:
    from ray import serve

    serve.delete(name)


def _ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 3) if a and b else None
