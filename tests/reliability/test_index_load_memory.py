"""Loading a version must fit beside the serving one (issue #20 item 4): one buffer, a memory check, no crash."""

from __future__ import annotations

import json
import tracemalloc
import uuid
from collections.abc import Iterator

import numpy as np
import pytest

from hlm.index import AdIndex
from hlm.live_index import LiveIndex
from hlm.redis_client import redis_client
from hlm.store import IndexStore, IntegrityError

pytestmark = [pytest.mark.integration, pytest.mark.reliability]


def flat_index(seed: int, n: int, d: int = 64) -> AdIndex:
    x = np.random.default_rng(seed).standard_normal((n, d)).astype(np.float32)  # (N, d)
    return AdIndex.build([f"ad-{seed}-{i}" for i in range(n)], x, "space-a", "Flat")


@pytest.fixture
def store(redis_url: str) -> Iterator[IndexStore]:
    client = redis_client(redis_url)
    yield IndexStore(client, f"mem-{uuid.uuid4().hex[:8]}", chunk_bytes=1 << 20)
    client.close()


def test_a_load_streams_chunks_into_one_buffer(store: IndexStore, record_property) -> None:
    # Given a ~16 MB version in 1 MB chunks
    version = store.publish(flat_index(0, n=64_000))
    size = store.manifest(version)["size"]
    # When it is loaded, measuring Python's peak allocation (FAISS's own copy is C++ and not counted)
    tracemalloc.start()
    loaded = store.load(version)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    # Then the peak is one copy of the bytes plus one chunk and the id list (the old load held the chunk list
    # and their join too: 2.3x here)
    assert loaded.ntotal == 64_000
    assert peak < 1.5 * size, f"peak {peak / size:.2f}x the index size"
    record_property("python_peak_over_index_size", round(peak / size, 2))


def test_a_version_that_does_not_fit_in_memory_is_not_fetched_and_the_replica_stays_up(store: IndexStore) -> None:
    version = store.publish(flat_index(1, n=4_000))
    size = store.manifest(version)["size"]
    fetched = []
    real_get = store.client.get
    store.client.get = lambda key: fetched.append(key) or real_get(key)
    live = LiveIndex(store, "space-a", available_memory=lambda: size)  # room for one copy, a load needs two
    # When the replica's first load would not fit
    assert live.refresh() is False
    # Then it says so, fetched no chunk, keeps running without an index, and loads once memory is there
    status = live.status()
    assert status["version"] is None and "not enough memory to load" in status["last_error"]
    assert not [k for k in fetched if ":chunk:" in k]
    live.available_memory = lambda: 10 * size
    assert live.refresh() is True and live.status()["version"] == version


def test_a_manifest_whose_sizes_disagree_is_refused_before_anything_is_fetched(store: IndexStore) -> None:
    version = store.publish(flat_index(2, n=1_000))
    manifest = store.manifest(version) | {"n_chunks": 10**9}  # a forged or corrupted manifest
    store.client.set(store.manifest_key(version), json.dumps(manifest))
    fetched = []
    real_get = store.client.get
    store.client.get = lambda key: fetched.append(key) or real_get(key)
    with pytest.raises(IntegrityError, match=f"version {version}: n_chunks 1000000000 is outside"):
        store.load(version)
    assert fetched == [store.manifest_key(version)]
