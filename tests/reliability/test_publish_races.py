"""Publishers, gc and operators racing on one index in a real redis-server (issue #20, items 2, 3 and 5).

Each race is staged, not timed: a publish runs in a thread that stops just before writing a chunk, the other
party acts, then the publish goes on.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import redis

from hlm.index import AdIndex
from hlm.live_index import LiveIndex
from hlm.redis_client import redis_client
from hlm.store import IndexStore, PublishError
from tests.conftest import REPO, free_port

pytestmark = [pytest.mark.integration, pytest.mark.reliability]


def flat_index(seed: int, n: int = 2000, d: int = 32) -> AdIndex:
    x = np.random.default_rng(seed).standard_normal((n, d)).astype(np.float32)  # (N, d)
    return AdIndex.build([f"ad-{seed}-{i}" for i in range(n)], x / np.linalg.norm(x, axis=1, keepdims=True),
                         "space-a", "Flat")


@pytest.fixture
def store(redis_url: str) -> Iterator[IndexStore]:
    client = redis_client(redis_url)
    yield IndexStore(client, f"race-{uuid.uuid4().hex[:8]}", chunk_bytes=16 * 1024)
    client.close()


class PausedPublish:
    """A publish in a thread that stops before writing chunk ``at`` until ``go()``."""

    def __init__(self, store: IndexStore, index: AdIndex, at: int = 2) -> None:
        self.reached, self.resume = threading.Event(), threading.Event()
        real_set = store.client.set

        def set_(key, value, *args, **kwargs):
            if isinstance(key, str) and key.endswith(f":chunk:{at}") and not self.reached.is_set():
                self.reached.set()
                self.resume.wait(30)
            return real_set(key, value, *args, **kwargs)

        store.client.set = set_
        self.pool = ThreadPoolExecutor(1)
        self.result: Future[str] = self.pool.submit(store.publish, index)
        assert self.reached.wait(30), "the publish never reached the pause"

    def go(self) -> str:
        self.resume.set()
        try:
            return self.result.result(30)
        finally:
            self.pool.shutdown()


def test_a_publish_that_started_before_a_rollback_cannot_undo_it(store: IndexStore, record_property) -> None:
    # Given v1 then v2 published, and a third publish that started while v2 was current
    v1 = store.publish(flat_index(1))
    store.publish(flat_index(2))
    late = PausedPublish(store, flat_index(3))
    # When an operator rolls back to v1 before that publish commits
    store.rollback(to=v1)
    # Then the late publish is refused and the operator's rollback stands
    with pytest.raises(PublishError, match="current moved"):
        late.go()
    assert store.current() == v1 and store.load().ids == flat_index(1).ids
    assert [k for k in store.client.scan_iter(match=f"{store.prefix}:v:*:manifest")
            if json.loads(store.client.get(k))["version"] not in store.versions()] == []
    record_property("late_publish", "refused; rollback kept")


def test_an_older_snapshot_that_commits_last_does_not_win(store: IndexStore) -> None:
    store.publish(flat_index(1))
    older = PausedPublish(store, flat_index(2))  # started first, from the state before `newer`
    # a second publisher on its own client (the paused one's set() is patched)
    newer = IndexStore(redis.Redis(connection_pool=store.client.connection_pool), store.name,
                       chunk_bytes=store.chunk_bytes)
    v_new = newer.publish(flat_index(3))
    with pytest.raises(PublishError, match="current moved"):
        older.go()
    assert store.current() == v_new


def test_two_nightly_runs_cannot_hold_the_lease_at_once(store: IndexStore) -> None:
    from hlm.lease import Lease, LeaseHeld

    with Lease(store.client, store.lease_key, owner="run-a", ttl_s=30):
        with pytest.raises(LeaseHeld, match="run-a"), Lease(store.client, store.lease_key, owner="run-b", ttl_s=30):
            pass
    with Lease(store.client, store.lease_key, owner="run-b", ttl_s=30) as lease:  # released: the next run may go
        assert store.client.get(store.lease_key).decode().startswith("run-b")
        assert lease.held()


def test_a_dead_runs_lease_expires_on_the_redis_clock(store: IndexStore) -> None:
    from hlm.lease import Lease

    dead = Lease(store.client, store.lease_key, owner="killed-run", ttl_s=1)
    dead.acquire(renew=False)  # a SIGKILLed run renews nothing and releases nothing
    while store.client.exists(store.lease_key):
        time.sleep(0.1)
    with Lease(store.client, store.lease_key, owner="next-night", ttl_s=30):
        assert not dead.held()


def test_gc_during_a_publish_in_flight_leaves_it_alone(store: IndexStore, record_property) -> None:
    # Given a publish in flight whose host clock is two hours behind Redis's (its created_at looks old)
    store.publish(flat_index(1))
    inflight = PausedPublish(store, flat_index(2))
    manifest_key = next(k for k in store.client.scan_iter(match=f"{store.prefix}:v:*:manifest")
                        if json.loads(store.client.get(k))["version"] != store.current())
    manifest = json.loads(store.client.get(manifest_key))
    manifest["created_at"] = "2000-01-01T00:00:00+00:00"
    store.client.set(manifest_key, json.dumps(manifest, sort_keys=True))
    # When gc runs before the publish finishes
    deleted = store.gc()
    # Then the publish in flight is untouched and completes
    assert deleted == []
    version = inflight.go()
    assert store.current() == version and store.load().ids == flat_index(2).ids
    record_property("gc_during_publish", "left alone")


def killed_publish(store: IndexStore, index: AdIndex, at: int) -> None:
    """A publish that dies before chunk ``at`` without any cleanup, as a SIGKILLed job does."""
    real_set, real_delete = store.client.set, store._delete_quietly

    def set_(key, value, *args, **kwargs):
        if isinstance(key, str) and key.endswith(f":chunk:{at}"):
            raise SystemExit("killed")
        return real_set(key, value, *args, **kwargs)

    store.client.set, store._delete_quietly = set_, lambda version: None
    with pytest.raises(SystemExit):
        store.publish(index)
    store.client.set, store._delete_quietly = real_set, real_delete


@pytest.fixture
def small_redis(tmp_path: Path) -> Iterator[redis.Redis]:
    """A private redis-server (maxmemory is set per test), noeviction as in production (infra/kuberay/redis.yaml)."""
    port = free_port()
    pid = subprocess.run([str(REPO / "infra/redis/start.sh"), str(port), str(tmp_path / "redis")], check=True,
                         capture_output=True, text=True).stdout.strip()
    client = redis_client(f"redis://127.0.0.1:{port}/0")
    yield client
    client.close()
    subprocess.run(["kill", pid], check=False)


def test_a_killed_publish_does_not_wedge_the_next_one_under_noeviction(small_redis: redis.Redis,
                                                                       record_property) -> None:
    # Given a publish killed after writing most of an index-sized version, and Redis sized for one more version
    store = IndexStore(small_redis, "ads", chunk_bytes=64 * 1024, heartbeat_s=1)
    before = int(small_redis.info("memory")["used_memory"])
    v1 = store.publish(flat_index(1, n=8000))  # 16 chunks
    one_version = int(small_redis.info("memory")["used_memory"]) - before
    killed_publish(store, flat_index(2, n=8000), at=12)  # 12 of 16 chunks left behind
    used = int(small_redis.info("memory")["used_memory"])
    small_redis.config_set("maxmemory", used + int(0.8 * one_version))  # a new version fits only without the orphan
    while list(small_redis.scan_iter(match="hlm:ads:v:*:writing")):
        time.sleep(0.1)  # the killed publisher's heartbeat runs out on Redis's clock
    # When the next night publishes
    v3 = store.publish(flat_index(3, n=8000))
    # Then it succeeds: the orphan was removed before writing
    assert store.current() == v3 and store.versions() == [v3, v1]
    versions_in_redis = {k.decode().split(":")[3] for k in small_redis.scan_iter(match="hlm:ads:v:*")}
    assert versions_in_redis == {v1, v3}
    record_property("orphan_before_publish", "swept; publish fitted under maxmemory")


def garbage_version(store: IndexStore) -> str:
    """A version whose chunk passes its sha256 but is not a FAISS index (e.g. written by another FAISS version)."""
    good = store.publish(flat_index(1))
    manifest = store.manifest(good)
    blob = b"not a faiss index written by this faiss"
    version = "v-skewed"
    manifest.update(version=version, n_chunks=1, size=len(blob), sha256=hashlib.sha256(blob).hexdigest())
    store.client.set(store.manifest_key(version), json.dumps(manifest))
    store.client.set(store.chunk_key(version, 0), blob)
    store.client.set(store.ids_key(version), store.client.get(store.ids_key(good)))
    store.client.lpush(store.versions_key, version)
    store.client.set(store.current_key, version)
    return version


def test_a_version_that_fails_to_deserialise_is_refused_once_and_not_refetched(store: IndexStore) -> None:
    live = LiveIndex(store, "space-a")
    store.publish(flat_index(0))
    assert live.refresh()
    serving = live.snapshot.version
    bad = garbage_version(store)
    loads = []
    real_load = store.load
    store.load = lambda *a, **kw: loads.append(a) or real_load(*a, **kw)
    # When the replica polls twice
    assert live.refresh() is False and live.refresh() is False
    # Then the version is refused (with why), fetched once only, and the replica still serves what it had
    assert bad in live.state.refused and "deserialise" in live.state.refused[bad]
    assert len(loads) == 1 and live.snapshot.version == serving
