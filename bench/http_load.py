"""What the HTTP benchmarks share: the Serve app on a local Ray, and an asyncio
client that drives `POST /v1/search` at a fixed concurrency for a bounded number of requests and a bounded time
(query texts and percentiles come from `bench.common`, like every benchmark's).

    async with client() as session:
        step = await drive(session, f"{base_url}/v1/search", queries, concurrency=8, n_requests=200, max_seconds=20)
    step.summary()  # concurrency, requests, ok, errors, errors_by_status, p50_ms, p99_ms, mean_ms, qps, wall_s
"""

from __future__ import annotations

import asyncio
import os
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field

import aiohttp
import numpy as np

from bench.common import free_port, ms_percentiles
from hlm.api import API_KEY_ENV

# ---------------------------------------------------------------------------------------------- services

@contextmanager
def on_cores(cores: set[int] | None) -> Iterator[None]:
    """This process (and what it starts meanwhile) runs on `cores` inside the block; None leaves it alone."""
    before = os.sched_getaffinity(0)
    if cores:
        os.sched_setaffinity(0, cores)
    try:
        yield
    finally:
        os.sched_setaffinity(0, before)


def split_cores() -> tuple[set[int] | None, set[int] | None]:
    """(cores for Ray's processes and the in-process reference, cores for the load generator): the last core for
    the client, so it never takes the replicas' CPU; (None, None) on a one-core machine."""
    cores = sorted(os.sched_getaffinity(0))
    return (set(cores[:-1]), {cores[-1]}) if len(cores) > 1 else (None, None)


@contextmanager
def serve_on_local_ray(num_cpus: int = 4, cores: set[int] | None = None) -> Iterator[str]:
    """A fresh local Ray with Serve's HTTP proxy on a free loopback port; yields the base URL. With `cores`, every
    Ray process (GCS, raylet, controller, proxy, replicas) is pinned to them: they inherit the affinity at start."""
    import ray
    from ray import serve

    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # replicas inherit it: nothing is fetched at run time
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    # Ray runs its workers at nice 15 by default; the in-process reference runs at this process's nice 0. On a box
    # shared with other jobs that alone makes Serve look slower, so the replicas get the reference's priority.
    os.environ.setdefault("RAY_worker_niceness", str(os.nice(0)))
    port = free_port()
    with on_cores(cores):
        ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=False)
        serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()
        ray.shutdown()


def serve_mode() -> str:
    """Which Serve data path this process's Ray runs: what `make bench` sets (the cluster's, infra/kuberay) or the
    default Python proxy. Ray reads these variables when it starts, so a benchmark records them, never sets them."""
    flags = [v for v in ("RAY_SERVE_THROUGHPUT_OPTIMIZED", "RAY_SERVE_ENABLE_HA_PROXY") if os.environ.get(v) == "1"]
    return "+".join(flags) or "default proxy"


def deploy(name: str, route_prefix: str, args: dict) -> None:
    """`serving.app:build_app(args)` as the Serve application `name`; returns once every replica is up."""
    from ray import serve

    from serving.app import build_app

    serve.run(build_app(args), name=name, route_prefix=route_prefix)


def auth_headers() -> dict[str, str]:
    """The header that opens the app when ``$HLM_API_KEY`` is set (`build_app` then requires it), else none."""
    key = os.environ.get(API_KEY_ENV)
    return {"X-API-Key": key} if key else {}


# ---------------------------------------------------------------------------------------------- load

@dataclass
class Sample:
    latency_s: float
    status: int | str  # the HTTP status, or the exception's type when no response came back
    body: dict | None = None  # the JSON of a 200


@dataclass
class Step:
    concurrency: int
    wall_s: float = 0.0
    samples: list[Sample] = field(default_factory=list)

    @property
    def ok(self) -> list[Sample]:
        return [s for s in self.samples if s.status == 200]

    def summary(self) -> dict:
        errors = Counter(str(s.status) for s in self.samples if s.status != 200)
        return {"concurrency": self.concurrency, "requests": len(self.samples), "ok": len(self.ok),
                "errors": sum(errors.values()), "errors_by_status": dict(errors), **latency_ms(self.ok),
                "qps": round(len(self.ok) / self.wall_s, 1) if self.wall_s else 0.0, "wall_s": round(self.wall_s, 2)}


def latency_ms(samples: Sequence[Sample]) -> dict:
    """p50/p99/mean in milliseconds (None when there is nothing to measure)."""
    if not samples:
        return {"p50_ms": None, "p99_ms": None, "mean_ms": None}
    seconds = np.array([s.latency_s for s in samples])
    return {**ms_percentiles(seconds), "mean_ms": round(float(seconds.mean()) * 1e3, 3)}


@asynccontextmanager
async def client(timeout_s: float = 30.0, headers: dict | None = None):
    """One aiohttp session (keep-alive connections, unbounded pool: `drive` bounds the concurrency)."""
    connector = aiohttp.TCPConnector(limit=0)
    timeout = aiohttp.ClientTimeout(total=timeout_s)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout, headers=headers) as session:
        yield session


async def drive(session: aiohttp.ClientSession, url: str, queries: Sequence[str], *, concurrency: int,
                n_requests: int, max_seconds: float, k: int = 10, halfway: asyncio.Event | None = None) -> Step:
    """`concurrency` clients POST `{"query", "k"}` back to back (queries in turn) until `n_requests` were sent
    or `max_seconds` passed; requests in flight at the deadline finish. `halfway` is set after n_requests/2."""
    step, sent = Step(concurrency), 0
    deadline = time.perf_counter() + max_seconds

    async def one_client() -> None:
        nonlocal sent
        while sent < n_requests and time.perf_counter() < deadline:
            payload = {"query": queries[sent % len(queries)], "k": k}
            sent += 1
            started = time.perf_counter()
            try:
                async with session.post(url, json=payload) as response:
                    body = await response.json() if response.status == 200 else None
                    status: int | str = response.status
            except (TimeoutError, aiohttp.ClientError) as e:
                body, status = None, type(e).__name__
            step.samples.append(Sample(time.perf_counter() - started, status, body))
            if halfway is not None and len(step.samples) >= n_requests // 2:
                halfway.set()

    started = time.perf_counter()
    await asyncio.gather(*(one_client() for _ in range(concurrency)))
    step.wall_s = time.perf_counter() - started
    if halfway is not None:
        halfway.set()  # a step cut short by max_seconds still releases whoever waits on it
    return step
