"""Streaming ad updates: event → visible latency under search load, search with pending deltas, updater throughput.

Against a private redis-server: a `StreamUpdater` in a process of its own (the teacher in-process, as
`pipelines.stream_ads` runs it: the updater is a job apart from the replicas, so it must not share their GIL), and
in this process a `LiveIndex` with its follower thread, 8 threads searching it (vectors, no query encoder: the
student's cost is `bench/encoder.py`'s), and a producer at a steady rate alternating deletes of base ads and
upserts of new ads. An event is visible at the first search, by a probe thread, that reflects it: a deleted
ad gone from the top 10 of its own vector, an upserted ad first for its text's teacher vector (computed before).
The base is random unit vectors in the teacher's space: the content of the base does not change these timings.

Visibility runs twice: with every process on every core, and isolated (the updater on one core, the replica,
its searchers and the probe on another), as a cluster gives the updater job CPUs of its own (`pipelines.stream_ads`
reserves them; a KubeRay pod has its own CPU limit). On 2 cores, 8 searchers that never pause otherwise take the
teacher's CPU too.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import ray
import torch

from bench.common import local_redis, ms_percentiles, write_result
from hlm.cli import init_ray
from hlm.config import ModelRef, load_config
from hlm.delta_index import DeltaIndex
from hlm.deltas import DeltaEntry
from hlm.encoder import Encoder
from hlm.events import AdEventProducer
from hlm.index import AdIndex
from hlm.live_index import LiveIndex
from hlm.redis_client import redis_client
from hlm.store import IndexStore
from hlm.updater import StreamUpdater, lease_key
from pipelines.embed import local_pool_cpus, run_embed

logger = logging.getLogger(__name__)
GOALS = {"delete_p99_ms": 1000, "upsert_p99_ms": 5000}


def unit(rng: np.random.Generator, n: int, d: int) -> np.ndarray:
    x = rng.standard_normal((n, d)).astype(np.float32)  # (n, d)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def updater_process(url: str, index: str, model: str, threads: int, cores: set[int] | None, stop) -> None:
    """The updater as its own process runs it: teacher loaded here, ``threads`` torch threads, on ``cores`` (None:
    any), until ``stop``."""
    if cores:
        os.sched_setaffinity(0, cores)  # before torch starts its threads, which inherit it
    torch.set_num_threads(threads)
    teacher = Encoder.load(ModelRef(model=model))
    StreamUpdater(redis_client(url), index, lambda t: teacher.encode(t, kind="ad"), teacher.space, batch_size=16,
                  block_ms=20).run(stop, lease_s=30)


def visibility(url: str, teacher: Encoder, model: str, base_ids: list[str], base: np.ndarray, *, rate: float,
               seconds: float, clients: int = 8, isolate: bool = False) -> dict:
    client = redis_client(url)
    store = IndexStore(client, f"bench-stream{'-isolated' if isolate else ''}")
    affinity = os.sched_getaffinity(0)
    first, second = sorted(affinity)[:2] if isolate else (None, None)
    if isolate:  # this thread's affinity, inherited by the follower, searcher and probe threads started below
        os.sched_setaffinity(0, {first})
    store.publish(AdIndex.build(base_ids, base, teacher.space), version="v1")
    n_events = int(rate * seconds)
    texts = [f"streamed ad {i}: cordless drill with {i % 7} batteries and case" for i in range(n_events // 2 + 1)]
    new_vec = teacher.encode(texts, kind="ad")  # (n, d): the probes' queries
    live = LiveIndex(store, teacher.space, poll_s=1.0)
    live.refresh()
    live.start()
    spawn = mp.get_context("spawn")
    stop, updater_stop = threading.Event(), spawn.Event()
    updater = spawn.Process(target=updater_process, name="hlm-updater", args=(
        url, store.name, model, torch.get_num_threads(), {second} if isolate else None, updater_stop))
    updater.start()
    threads: list[threading.Thread] = []
    searches = [0] * clients

    def search_load(i: int) -> None:
        q = unit(np.random.default_rng(i), 64, base.shape[1])
        while not stop.is_set():
            live.search(q[searches[i] % 64][None], 10)
            searches[i] += 1

    threads += [threading.Thread(target=search_load, args=(i,)) for i in range(clients)]
    outstanding: dict[int, tuple[str, str, np.ndarray, float]] = {}  # n -> (op, ad_id, probe vector, sent at)
    seen: dict[str, list[float]] = {"delete": [], "upsert": []}
    lock = threading.Lock()

    def probe() -> None:
        while not stop.is_set() or outstanding:
            with lock:
                items = list(outstanding.items())
            if not items:
                time.sleep(0.005)
                continue
            hits, _ = live.search(np.stack([v for _, (_, _, v, _) in items]), 10)
            now = time.perf_counter()
            for (n, (op, ad, _, sent)), row in zip(items, hits, strict=True):
                ids = [a for a, _ in row]
                if (op == "delete" and ad not in ids) or (op == "upsert" and ids and ids[0] == ad):
                    seen[op].append(now - sent)
                    with lock:
                        outstanding.pop(n)
            if stop.is_set() and time.perf_counter() > deadline:
                return

    threads.append(threading.Thread(target=probe))
    for t in threads:
        t.start()
    while not client.exists(lease_key(store.name)):  # the updater loaded its teacher and took its lease
        if not updater.is_alive():
            raise RuntimeError(f"the updater process exited with {updater.exitcode} before taking its lease")
        time.sleep(0.1)
    producer = AdEventProducer(client, store.name)
    start = time.perf_counter()
    for n in range(n_events):
        time.sleep(max(0.0, start + n / rate - time.perf_counter()))
        if n % 2 == 0:
            ad, vec = base_ids[n], base[n]
            sent = time.perf_counter()
            producer.delete(ad)
            op = "delete"
        else:
            ad, vec, op = f"new-{n}", new_vec[n // 2], "upsert"
            sent = time.perf_counter()
            producer.upsert(ad, texts[n // 2])
        with lock:
            outstanding[n] = (op, ad, vec, sent)
    deadline = time.perf_counter() + 30
    while outstanding and time.perf_counter() < deadline:
        time.sleep(0.05)
    stop.set()
    updater_stop.set()
    live.stop()
    for t in threads:
        t.join()
    updater.join(timeout=60)
    os.sched_setaffinity(0, affinity)
    out = {f"{op}_visible_ms": ms_percentiles(np.array(v)) for op, v in seen.items() if v}
    return {**out, "events": n_events, "never_visible": len(outstanding), "rate_per_s": rate, "clients": clients,
            "cores": f"updater on core {second}, the rest on core {first}" if isolate else "all share every core",
            "searches_per_s": round(sum(searches) / (time.perf_counter() - start), 1)}


def pending_delta_search(base_ids: list[str], base: np.ndarray, space: str, n_deltas: int, *, queries: int) -> dict:
    """Search p50 of one query, k=10, on the base alone vs with ``n_deltas`` applied (half upserts, half deletes)."""
    rng = np.random.default_rng(1)
    index = AdIndex.build(base_ids, base, space)
    delta = DeltaIndex(index, "0-0")
    vecs = unit(rng, n_deltas, base.shape[1])
    delta.apply([DeltaEntry(f"{n + 1}-0", "delete", base_ids[n], None, None) if n % 2 else
                 DeltaEntry(f"{n + 1}-0", "upsert", f"new-{n}", vecs[n], space) for n in range(n_deltas)])
    q = unit(rng, queries, base.shape[1])
    timings: dict[str, list[float]] = {"none": [], "pending": []}
    for i in range(queries):  # interleaved, so machine noise hits both alike
        for name, fn in (("none", lambda x: index.search_ids(x, 10)), ("pending", lambda x: delta.search(x, 10))):
            t = time.perf_counter()
            fn(q[i:i + 1])
            timings[name].append(time.perf_counter() - t)
    p50 = {k: float(np.median(v)) * 1000 for k, v in timings.items()}
    return {"base_ads": len(base_ids), "pending_deltas": n_deltas, "p50_ms_none": round(p50["none"], 3),
            "p50_ms_pending": round(p50["pending"], 3),
            "ratio_pending_over_none": round(p50["pending"] / p50["none"], 3)}


def throughput(client, teacher: Encoder, model: str, n: int) -> dict:
    """Updater events/s (all upserts, batch 64, through Redis) vs the same teacher over the same texts as a
    `pipelines.embed` job (Ray Data, one single-threaded actor, as the updater has one teacher) and as a plain
    `encode` loop."""
    texts = [f"throughput ad {i}: white paint {i % 13} gallons, interior, low odour" for i in range(n)]
    t = time.perf_counter()
    teacher.encode(texts, kind="ad", batch_size=64)
    encode_rps = n / (time.perf_counter() - t)
    cfg = load_config(overrides=["embed.batch_size=64", "embed.num_actors=1", "embed.num_cpus=1"])
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "ads.parquet"
        pq.write_table(pa.table({"ad_id": [f"t{i}" for i in range(n)], "text": texts}), src)
        init_ray(local_pool_cpus(cfg), include_dashboard=False, log_to_driver=False)
        try:
            job_rps = n / run_embed(cfg, ModelRef(model=model), src, "ads", Path(tmp) / "out")["seconds"]
        finally:
            ray.shutdown()
    store = IndexStore(client, "bench-throughput")
    store.publish(AdIndex.build(["x"], unit(np.random.default_rng(0), 1, teacher.dim), teacher.space), version="v1")
    AdEventProducer(client, store.name).send([{"op": "upsert", "ad_id": f"t{i}", "text": s}
                                              for i, s in enumerate(texts)])
    updater = StreamUpdater(client, store.name, lambda x: teacher.encode(x, kind="ad", batch_size=64), teacher.space,
                            batch_size=64, block_ms=10)
    updater.ensure_group()
    t = time.perf_counter()
    while entries := updater.read():
        updater.process(entries)
    updater_eps = n / (time.perf_counter() - t)
    return {"events": n, "updater_events_per_s": round(updater_eps, 1), "embed_job_rows_per_s": round(job_rps, 1),
            "ratio_updater_over_embed_job": round(updater_eps / job_rps, 3),
            "encode_rows_per_s": round(encode_rps, 1), "ratio_updater_over_encode": round(updater_eps / encode_rps, 3)}


def run(out_dir: Path, *, quick: bool = False, model: str = "teacher-default") -> dict:
    n_base, seconds, n_deltas, n_tp = (2_000, 5, 1_000, 64) if quick else (20_000, 30, 10_000, 512)
    teacher = Encoder.load(ModelRef(model=model))
    rng = np.random.default_rng(0)
    base_ids = [f"ad-{i}" for i in range(n_base)]
    base = unit(rng, n_base, teacher.dim)
    with tempfile.TemporaryDirectory() as tmp, local_redis(Path(tmp)) as url:
        client = redis_client(url)
        numbers = {"visibility": visibility(url, teacher, model, base_ids, base, rate=20, seconds=seconds),
                   **({"visibility_isolated": visibility(url, teacher, model, base_ids, base, rate=20,
                                                         seconds=seconds, isolate=True)}
                      if len(os.sched_getaffinity(0)) >= 2 else {}),
                   "search_with_deltas": pending_delta_search(base_ids, base, teacher.space, n_deltas,
                                                              queries=100 if quick else 300),
                   "throughput": throughput(client, teacher, model, n_tp), "goals": GOALS}
    write_result(out_dir, "stream", {"model": model, "quick": quick, "base_ads": n_base, "seconds": seconds}, numbers)
    return numbers


def problems(numbers: dict) -> list[str]:
    return [f"{key}: {v['never_visible']} events never became visible"
            for key, v in numbers.items() if key.startswith("visibility") and v["never_visible"]]
