"""The Serve app under stepped load (1 → 64 concurrent clients) while three new index versions are published.

Reports, per step and overall: requests, errors by status, p50/p99 latency and QPS, the index versions seen, and
whether any response mixed versions. Every version holds the same ad vectors under ids prefixed with its
generation (`g2-ad-000123`), so a response is mixed when its ads' prefixes are not all the generation of the
`index_version` it names. Version g0 is published before the load; g1, g2, g3 halfway through steps 2, 3, 4.
The load generator runs on a core of its own, away from Ray's (`bench.http_load.split_cores`).

    python -m bench.load --out bench/results   # exits 1 on any error or mixed-version response (`problems`)
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import tempfile
import time
from pathlib import Path

from bench.common import local_redis, realistic_queries, write_result
from bench.http_load import (
    Step,
    auth_headers,
    client,
    deploy,
    drive,
    latency_ms,
    on_cores,
    serve_mode,
    serve_on_local_ray,
    split_cores,
)
from hlm.catalog import generate_catalog
from hlm.cli import setup_logging
from hlm.encoder import Encoder
from hlm.index import AdIndex
from hlm.redis_client import redis_client
from hlm.store import IndexStore

logger = logging.getLogger(__name__)

MODEL = "student-default"
STEPS = (1, 8, 32, 64)
APP_ARGS = {"min_replicas": 1, "max_replicas": 1, "max_batch_size": 32, "poll_s": 1.0}


def generation(ad_id: str) -> str:
    return ad_id.split("-", 1)[0]


def is_mixed(body: dict, generation_of: dict[str, str]) -> bool:
    """The ads of one response do not all come from the generation of the version it names."""
    return {generation(a["ad_id"]) for a in body["ads"]} != {generation_of.get(body["index_version"], "?")}


async def publish_when(event: asyncio.Event, store: IndexStore, index: AdIndex) -> str:
    await event.wait()
    return await asyncio.to_thread(store.publish, index, source="bench.load")  # off the event loop


async def load_with_swaps(url: str, queries: list[str], store: IndexStore, versions: list[AdIndex],
                          n_requests: dict[int, int], max_seconds: float) -> tuple[list[Step], list[str]]:
    """Run STEPS in turn; during step i ≥ 1, publish versions[i] once half of its requests are done."""
    steps, published = [], []
    async with client(headers=auth_headers()) as session:
        await drive(session, url, queries, concurrency=4, n_requests=8, max_seconds=120)  # warm-up, not counted
        for i, concurrency in enumerate(STEPS):
            halfway = asyncio.Event()
            load = drive(session, url, queries, concurrency=concurrency, n_requests=n_requests[concurrency],
                         max_seconds=max_seconds, halfway=halfway)
            if i == 0:
                steps.append(await load)
                continue
            step, version = await asyncio.gather(load, publish_when(halfway, store, versions[i]))
            steps.append(step)
            published.append(version)
    return steps, published


def run(out_dir: Path, *, quick: bool = False) -> dict:
    n_ads, max_seconds = (100, 8.0) if quick else (500, 45.0)
    n_requests = {c: max(20, 4 * c) if quick else max(200, 30 * c) for c in STEPS}
    started = time.perf_counter()
    queries, query_source = realistic_queries(400)
    ads = generate_catalog(n_ads=n_ads, n_queries=0).ads
    encoder = Encoder.load(MODEL)
    ad_emb = encoder.encode(ads.column("text").to_pylist(), kind="ad")  # (N, d), shared by every version
    versions = [AdIndex.build([f"g{g}-{a}" for a in ads.column("ad_id").to_pylist()], ad_emb, encoder.space, "Flat")
                for g in range(len(STEPS))]
    del encoder
    with tempfile.TemporaryDirectory(ignore_cleanup_errors=True) as tmp, local_redis(Path(tmp) / "redis") as redis_url:
        store = IndexStore(redis_client(redis_url), "bench-load")
        published = [store.publish(versions[0], source="bench.load")]
        cores, client_cores = split_cores()
        with serve_on_local_ray(num_cpus=4, cores=cores) as base_url:
            deploy("load", "/", {**APP_ARGS, "student": {"model": MODEL}, "index": store.name, "redis_url": redis_url})
            with on_cores(client_cores):
                steps, swapped = asyncio.run(load_with_swaps(f"{base_url}/v1/search", queries, store, versions,
                                                             n_requests, max_seconds))
    published += swapped
    generation_of = {v: f"g{g}" for g, v in enumerate(published)}
    numbers: dict = {}
    for step in steps:
        summary, seen = step.summary(), dict.fromkeys(s.body["index_version"] for s in step.ok)
        numbers |= {f"c{step.concurrency}_{key}": summary[key] for key in ("requests", "errors", "p50_ms", "p99_ms",
                                                                            "qps")}
        numbers[f"c{step.concurrency}_versions_seen"] = len(seen)
    everything = Step(0, samples=[s for step in steps for s in step.samples])
    total = everything.summary()
    seen = list(dict.fromkeys(s.body["index_version"] for s in everything.ok))
    mixed = sum(is_mixed(s.body, generation_of) for s in everything.ok)
    numbers |= {"requests": total["requests"], "errors": total["errors"], "errors_by_status": total["errors_by_status"],
                **latency_ms(everything.ok), "swaps": len(swapped), "versions_published": published,
                "versions_seen": seen, "all_versions_seen": set(seen) == set(published),
                "unknown_versions_seen": sorted(set(seen) - set(published)), "mixed_responses": mixed,
                "any_mixed": mixed > 0, "wall_s": round(time.perf_counter() - started, 1)}
    config = {"model": MODEL, "n_ads": n_ads, "factory": "Flat", "app_args": APP_ARGS, "steps": list(STEPS),
              "requests_per_step": n_requests, "max_seconds_per_step": max_seconds,
              "swap_at": "halfway through each step after the first", "queries": query_source, "quick": quick,
              "serve_mode": serve_mode(), "ray_cores": sorted(cores) if cores else None,
              "client_cores": sorted(client_cores) if cores else None}
    path = write_result(out_dir, "load", config, numbers)
    logger.info("load benchmark: %s -> %s", numbers, path)
    return numbers


def problems(numbers: dict) -> list[str]:
    """Why this run must fail `make bench` (empty when it passed): errors, mixed or unknown versions, a swap
    that was never served."""
    found = []
    if numbers["errors"]:
        found.append(f"{numbers['errors']} failed requests: {numbers['errors_by_status']}")
    if numbers["any_mixed"]:
        found.append(f"{numbers['mixed_responses']} responses mixed index versions")
    if numbers["unknown_versions_seen"]:
        found.append(f"responses named unpublished versions {numbers['unknown_versions_seen']}")
    if not numbers["all_versions_seen"]:
        found.append("a published version was never served")
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    parser.add_argument("--quick", action="store_true", help="tiny sizes, for a CI smoke run")
    args = parser.parse_args(argv)
    setup_logging()
    found = problems(run(args.out, quick=args.quick))
    for problem in found:
        logger.error("load benchmark failed: %s", problem)
    return 1 if found else 0


if __name__ == "__main__":
    raise SystemExit(main())
