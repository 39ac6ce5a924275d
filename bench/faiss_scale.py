"""FAISS at scale on synthetic embeddings: Flat vs HNSW32 vs IVF-PQ (± SQ8 re-ranking), and publish/load through Redis.

Per (N, d) and index: build time, size (bytes of the serialised index), search latency at batch 1 (p50 per
query), batch throughput, recall@100 against the exact top-100 of the Flat index over the same vectors; then,
for indexes up to `PUBLISH_MAX_BYTES`, the time to publish the version to Redis (`hlm.store.IndexStore`: write,
read back, verify, flip `current`) and to load it back (fetch, sha256, deserialise).

The vectors are a mixture of Gaussian clusters, normalised: uniform random unit vectors have no neighbourhood
structure at these widths, so every ANN index looks hopeless on them, which real embeddings are not.

Sized so the full run (100K and 1M × 384 and 768) fits `make bench`'s 30 minutes on 2 cores, one FAISS thread
(506 s with an embedding job on the same cores; 239 s on a quiet box before the SQ8 and 100K × 768 HNSW rows):
* IVF-PQ is `IVF{≈sqrt(N)}_HNSW32,PQ{d/4}x4fs`: 4-bit fast-scan codes (d/8 bytes a vector; 8-bit PQ trained ~10×
  slower here) behind an HNSW coarse quantizer (assigning 1M vectors to 1024 lists by brute force cost minutes),
  trained on 40 vectors per list (FAISS warns below 39), searched with nprobe 16;
* IVF-PQ+SQ8 is the same index behind a `Refine(SQ8)` layer that re-scores `K_FACTOR`·k PQ candidates with 8-bit
  codes (d bytes a vector). At 1M the exact top-100 all lie in the 16 probed lists, yet 4-bit PQ ranks only 37% of
  them in its top 100: the loss is the codes, not the probing (nprobe 64 gives the same 0.37), so re-scoring is the fix;
* HNSW32 is built at `HNSW_SIZES` only, with efConstruction 20 (FAISS's default 40 took 356 s at 100K × 384 on a
  busy 2-core box, and the build grows as N log N). At 1M × 384 one build took 265 s (with another job on the
  cores) and reached recall@100 0.70 at efSearch 128, so 1M is left out of the 30-minute run;
* the exact reference at 1M uses 100 queries, not 1,000 (a Flat top-100 costs ~0.75 s a query at 1M × 384 here).
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

import faiss
import numpy as np

from bench.common import local_redis, save_figure, write_result
from hlm.index import AdIndex
from hlm.redis_client import redis_client
from hlm.store import IndexStore

logger = logging.getLogger(__name__)

K = 100
EF_CONSTRUCTION = 20
EF_SEARCH = 128  # HNSW: FAISS searches with max(efSearch, k), so this is a little above k=100
NPROBE = 16
K_FACTOR = 10  # IVF-PQ+SQ8: the PQ stage returns k·K_FACTOR candidates for the SQ8 codes to re-score
QUANTIZER_EF_SEARCH = 64  # the IVF coarse quantizer's HNSW: well above nprobe, so the nearest lists are found
PUBLISH_MAX_BYTES = 256 << 20  # a 3 GB Flat blob takes ~4 copies of RAM and minutes here (and belongs in object
# storage at that size, docs/design.md "Index store in Redis"); 6 to 180 MB of published versions show the trend
FULL = [(100_000, 384, 1000), (100_000, 768, 1000), (1_000_000, 384, 100), (1_000_000, 768, 100)]  # (N, d, queries)
QUICK = [(10_000, 64, 200)]
HNSW_SIZES = {(100_000, 384), (100_000, 768), (10_000, 64)}


def factories(n: int, d: int) -> dict[str, str]:
    nlist = 1 << max(4, round(np.log2(np.sqrt(n))))  # a power of 2 near sqrt(N): 128 at 10K, 256 at 100K, 1024 at 1M
    ivf_pq = f"IVF{nlist}_HNSW32,PQ{d // 4}x4fs"
    out = {"Flat": "Flat", "HNSW32": "HNSW32", "IVF-PQ": ivf_pq, "IVF-PQ+SQ8": f"{ivf_pq},Refine(SQ8)"}
    return out if (n, d) in HNSW_SIZES else {k: v for k, v in out.items() if k != "HNSW32"}


def synthetic(n: int, d: int, seed: int, *, n_clusters: int = 1000, spread: float = 0.7,
              chunk: int = 100_000) -> np.ndarray:
    """(n, d) float32 unit vectors: cluster centre + spread × noise, normalised; written chunk by chunk."""
    rng = np.random.default_rng(seed)
    centres = np.random.default_rng(12345).standard_normal((n_clusters, d), dtype=np.float32)  # same for all seeds
    out = np.empty((n, d), dtype=np.float32)
    for start in range(0, n, chunk):
        m = min(chunk, n - start)
        x = centres[rng.integers(0, n_clusters, m)] + spread * rng.standard_normal((m, d), dtype=np.float32)
        out[start:start + m] = x / np.linalg.norm(x, axis=1, keepdims=True)
    return out


def build(factory: str, ids: list[str], xb: np.ndarray) -> AdIndex:
    if factory.startswith("IVF"):
        nlist = int(factory[3:factory.index("_")])
        return AdIndex.build(ids, xb, "bench", factory, train_size=min(len(xb), 40 * nlist), nprobe=NPROBE,
                             ef_search=QUANTIZER_EF_SEARCH, k_factor=K_FACTOR if "Refine" in factory else None)
    if factory.startswith("HNSW"):  # built here: AdIndex.build has no efConstruction (FAISS's default is 40)
        index = faiss.index_factory(xb.shape[1], factory, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = EF_CONSTRUCTION
        index.add(xb)
        index.hnsw.efSearch = EF_SEARCH
        return AdIndex(index, ids, "bench", factory)
    return AdIndex.build(ids, xb, "bench", factory)


def latency_p50_ms(index: AdIndex, xq: np.ndarray, *, max_queries: int, budget_s: float) -> tuple[float, int]:
    """(p50 ms, queries timed) at batch 1; stops after `budget_s` once 10 queries are in (Flat at 1M is slow)."""
    seconds = []
    started = time.perf_counter()
    for q in xq[:max_queries]:
        t = time.perf_counter()
        index.search(q[None, :], K)  # (1, d) -> (1, K)
        seconds.append(time.perf_counter() - t)
        if len(seconds) >= 10 and time.perf_counter() - started > budget_s:
            break
    return round(float(np.median(seconds)) * 1e3, 3), len(seconds)


def recall(I: np.ndarray, I_exact: np.ndarray) -> float:  # noqa: E741 (FAISS names)
    """Mean over queries of |top-k ∩ exact top-k| / k; I, I_exact (B, k)."""
    return float(np.mean([len(set(a) & set(b)) / I_exact.shape[1] for a, b in zip(I, I_exact, strict=True)]))


def serialised_bytes(index: faiss.Index) -> int:
    """len(faiss.serialize_index(index)), counted as it is written instead of holding a copy (3 GB at 1M × 768)."""
    size = 0

    def count(chunk: bytes) -> None:
        nonlocal size
        size += len(chunk)

    faiss.write_index(index, faiss.PyCallbackIOWriter(count))
    return size


def publish_and_load(store: IndexStore, index: AdIndex) -> dict:
    started = time.perf_counter()
    version = store.publish(index, source="bench")
    published = time.perf_counter()
    store.load(version)
    loaded = time.perf_counter()
    keys = list(store.client.scan_iter(match=f"{store.prefix}:*", count=1000))
    store.client.delete(*keys)  # the next publish must not pay for a fuller Redis
    return {"publish_s": round(published - started, 3), "load_s": round(loaded - published, 3)}


def measure(n: int, d: int, n_queries: int, store: IndexStore | None) -> list[dict]:
    """One row per index type at (n, d)."""
    xb, xq = synthetic(n, d, seed=1), synthetic(n_queries, d, seed=2)  # (N, d), (B, d)
    ids = [f"ad-{i:07d}" for i in range(n)]
    rows, I_exact = [], None
    for name, factory in factories(n, d).items():
        started = time.perf_counter()
        index = build(factory, ids, xb)
        build_s = time.perf_counter() - started
        started = time.perf_counter()
        _, I = index.search(xq, K)  # noqa: E741 (B, K)
        batch_s = time.perf_counter() - started
        I_exact = I if name == "Flat" else I_exact  # Flat runs first: the exact reference
        p50, timed = latency_p50_ms(index, xq, max_queries=200, budget_s=10.0)
        size = serialised_bytes(index.index)
        row = {"n": n, "d": d, "index": name, "factory": factory, "build_s": round(build_s, 2), "bytes": size,
               "latency_p50_ms": p50, "latency_queries": timed, "batch_qps": round(n_queries / batch_s, 1),
               f"recall@{K}": round(recall(I, I_exact), 4)}
        if store is not None and size <= PUBLISH_MAX_BYTES:
            row |= publish_and_load(store, index)
        rows.append(row)
        logger.info("faiss_scale %s", row)
        del index
    return rows


def run(out_dir: Path, *, quick: bool = False, redis_url: str | None = None) -> dict:
    """`redis_url`: a server to publish to (keys hlm:bench-faiss-scale:*, deleted as it goes); None starts a
    throwaway one, and without redis-server installed the publish/load columns are left out."""
    sizes = QUICK if quick else FULL
    started = time.perf_counter()
    if redis_url is None and shutil.which("redis-server") is None:
        logger.warning("redis-server is not installed: publish/load times are skipped (`make redis-server`)")
        rows = [r for n, d, nq in sizes for r in measure(n, d, nq, None)]
    else:
        with tempfile.TemporaryDirectory(prefix="bench-redis-") as tmp, \
                local_redis(Path(tmp)) if redis_url is None else nullcontext(redis_url) as url:
            store = IndexStore(redis_client(url), "bench-faiss-scale")
            rows = [r for n, d, nq in sizes for r in measure(n, d, nq, store)]
    numbers = {"seconds": round(time.perf_counter() - started, 1), "rows": rows}
    config = {"sizes": [list(s) for s in sizes], "k": K, "hnsw_sizes": sorted(map(list, HNSW_SIZES)),
              "ef_construction": EF_CONSTRUCTION, "ef_search": EF_SEARCH, "nprobe": NPROBE, "k_factor": K_FACTOR,
              "quantizer_ef_search": QUANTIZER_EF_SEARCH, "publish_max_bytes": PUBLISH_MAX_BYTES,
              "faiss_threads": faiss.omp_get_max_threads(), "quick": quick}
    write_result(out_dir, "faiss_scale", config, numbers)
    return numbers


def plot(record: dict, out_dir: Path) -> list[Path]:
    """faiss_scale.png: recall@100 vs latency per (index, N, d), and publish/load seconds vs index bytes."""
    import matplotlib.pyplot as plt

    rows = record["numbers"]["rows"]
    fig, (rl, pl) = plt.subplots(1, 2, figsize=(11, 4))
    markers = {"Flat": "s", "HNSW32": "o", "IVF-PQ": "^", "IVF-PQ+SQ8": "v"}
    for r in rows:
        rl.scatter(r["latency_p50_ms"], r[f"recall@{K}"], marker=markers.get(r["index"], "x"))
        rl.annotate(f"{r['index']} {r['n'] // 1000}K×{r['d']}", (r["latency_p50_ms"], r[f"recall@{K}"]), fontsize=7)
    rl.set_xscale("log")
    rl.set_xlabel("search latency p50 at batch 1 (ms, log)")
    rl.set_ylabel(f"recall@{K} vs exact")
    published = [r for r in rows if "publish_s" in r]
    for key, colour in (("publish_s", "tab:red"), ("load_s", "tab:blue")):
        pl.scatter([r["bytes"] / 2**20 for r in published], [r[key] for r in published], color=colour,
                   label=key.removesuffix("_s"))
    pl.set_xlabel("serialised index (MiB)")
    pl.set_ylabel("seconds (Redis, one version)")
    pl.legend()
    fig.suptitle("FAISS at scale (synthetic clustered unit vectors)")
    return save_figure(fig, out_dir, "faiss_scale")
