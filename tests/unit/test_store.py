"""IndexStore logic on fakeredis: key layout, chunking, manifest, publish checks, rollback, gc, client settings."""

from __future__ import annotations

import hashlib
import json
import math
from datetime import UTC, datetime, timedelta

import faiss
import fakeredis
import numpy as np
import pytest
import redis

from hlm.index import AdIndex
from hlm.store import IndexStore, IntegrityError, PublishError, StoreError, new_version
from tests.conftest import received

N, D_MODEL = 300, 16


def small_index(seed: int = 0, space: str = "space-a", n: int = N) -> AdIndex:
    x = np.random.default_rng(seed).standard_normal((n, D_MODEL)).astype(np.float32)
    return AdIndex.build([f"ad-{seed}-{i}" for i in range(n)], x / np.linalg.norm(x, axis=1, keepdims=True), space)


@pytest.fixture
def client() -> fakeredis.FakeRedis:
    return fakeredis.FakeRedis()


@pytest.fixture
def store(client: fakeredis.FakeRedis) -> IndexStore:
    return IndexStore(client, "ads", chunk_bytes=1024)


def keys(client: redis.Redis) -> set[str]:
    return {k.decode() for k in client.keys("*")}


def test_publish_writes_exactly_the_design_key_layout(store: IndexStore, client) -> None:
    version = store.publish(small_index(), source="unit")
    n = store.manifest(version)["n_chunks"]
    assert keys(client) == {"hlm:ads:current", "hlm:ads:versions", f"hlm:ads:v:{version}:manifest",
                            f"hlm:ads:v:{version}:ids", *(f"hlm:ads:v:{version}:chunk:{i}" for i in range(n))}
    assert client.get("hlm:ads:current") == version.encode()
    assert client.lrange("hlm:ads:versions", 0, -1) == [version.encode()]
    assert store.channel == "hlm:ads:events"


def test_small_chunks_split_the_blob_and_load_reassembles_it(store: IndexStore, client) -> None:
    # Given an index whose serialised blob spans many 1 KiB chunks
    index = small_index()
    blob = faiss.serialize_index(index.index).tobytes()
    version = store.publish(index)
    n = store.manifest(version)["n_chunks"]
    chunks = [client.get(store.chunk_key(version, i)) for i in range(n)]
    # Then every chunk is at most chunk_bytes and together they are the blob
    assert n == math.ceil(len(blob) / 1024) > 1
    assert all(len(c) <= 1024 for c in chunks) and b"".join(chunks) == blob
    # And load gives back an index with the same answers
    loaded = store.load()
    q = index.index.reconstruct_n(0, 5)  # (5, d)
    for got, want in zip(loaded.search(q, 10), index.search(q, 10), strict=True):
        np.testing.assert_array_equal(got, want)
    assert (loaded.ids, loaded.space, loaded.factory) == (index.ids, index.space, index.factory)


def test_manifest_describes_the_version(store: IndexStore, client) -> None:
    index = small_index()
    version = store.publish(index, source="nightly 2025-01-01")
    m = store.manifest(version)
    blob, ids_blob = index.to_bytes()
    assert {k: m[k] for k in ("space", "dim", "count", "factory", "source", "size")} == {
        "space": "space-a", "dim": D_MODEL, "count": N, "factory": "Flat", "source": "nightly 2025-01-01",
        "size": len(blob)}
    assert m["sha256"] == hashlib.sha256(blob).hexdigest()
    assert m["ids_sha256"] == hashlib.sha256(ids_blob).hexdigest()
    assert m["n_chunks"] == math.ceil(len(blob) / 1024)
    assert abs(datetime.fromisoformat(m["created_at"]) - datetime.now(UTC)) < timedelta(minutes=1)
    assert json.loads(client.get(store.manifest_key(version))) == m


def test_versions_are_newest_first_and_ids_sort_by_time(store: IndexStore) -> None:
    published = [store.publish(small_index(seed)) for seed in range(3)]
    assert store.versions() == published[::-1] == sorted(published, reverse=True)
    assert store.current() == published[-1]
    assert new_version() > published[-1]


def test_publishing_an_existing_version_is_refused(store: IndexStore) -> None:
    store.publish(small_index(), version="v1")
    with pytest.raises(PublishError, match="already exists"):
        store.publish(small_index(1), version="v1")
    assert store.load("v1").ids == small_index().ids


def test_a_chunk_that_reads_back_wrong_fails_the_publish_and_is_cleaned_up(store: IndexStore, client,
                                                                         monkeypatch) -> None:
    # Given a published version and a Redis that corrupts one chunk of the next publish
    old = store.publish(small_index(), version="v1")
    real_set = client.set

    def corrupting_set(key, value, *args, **kwargs):
        if key.endswith(":chunk:1"):
            value = bytes(value)[:-1] + b"\x00"
        return real_set(key, value, *args, **kwargs)

    monkeypatch.setattr(client, "set", corrupting_set)
    # When publishing, then the read-back check refuses it and nothing of it is left
    with pytest.raises(PublishError, match="do not match"):
        store.publish(small_index(1), version="v2")
    assert store.current() == old and store.versions() == [old]
    assert not [k for k in keys(client) if ":v:v2:" in k]


def test_load_refuses_a_missing_chunk_naming_version_and_chunk_count(store: IndexStore, client) -> None:
    version = store.publish(small_index(), version="v1")
    n = store.manifest(version)["n_chunks"]
    client.delete(store.chunk_key(version, 2))
    with pytest.raises(IntegrityError, match=rf"version v1: chunk\(s\) \[2\] of {n} missing"):
        store.load()


def test_load_with_nothing_published_or_an_unknown_version(store: IndexStore) -> None:
    with pytest.raises(StoreError, match="nothing published"):
        store.load()
    with pytest.raises(StoreError, match="no version 'nope'"):
        store.load("nope")


def test_rollback_moves_current_back_one_version_at_a_time(store: IndexStore, client) -> None:
    v1, v2, v3 = (store.publish(small_index(s), version=f"v{s + 1}") for s in range(3))
    with client.pubsub(ignore_subscribe_messages=True) as sub:
        sub.subscribe(store.channel)
        assert store.rollback() == v2 and store.current() == v2
        assert store.rollback() == v1 and store.load().ids == small_index(0).ids
        assert received(sub, 2) == [b"v2", b"v1"]
    with pytest.raises(StoreError, match="no version older than 'v1'"):
        store.rollback()
    assert store.rollback(to=v3) == v3 and store.versions() == [v3, v2, v1]


def test_rollback_refuses_unknown_and_incomplete_versions(store: IndexStore, client) -> None:
    store.publish(small_index(0), version="v1")
    store.publish(small_index(1), version="v2")
    with pytest.raises(StoreError, match="'v9' is not a published version"):
        store.rollback(to="v9")
    client.delete(store.ids_key("v1"))
    with pytest.raises(IntegrityError, match="v1 is incomplete"):
        store.rollback()
    assert store.current() == "v2"


def test_gc_keeps_the_newest_n_and_never_current(store: IndexStore, client) -> None:
    # Given five versions with current rolled back to the oldest
    versions = [store.publish(small_index(s), version=f"v{s + 1}") for s in range(5)]
    store.rollback(to="v1")
    # When keeping two
    deleted = store.gc(keep=2)
    # Then v2 and v3 go, v1 stays because it is current
    assert sorted(deleted) == ["v2", "v3"]
    assert store.versions() == ["v5", "v4", "v1"]
    assert not [k for k in keys(client) if ":v:v2:" in k or ":v:v3:" in k]
    assert store.load().ids == small_index(0).ids and store.load("v5").ids == small_index(4).ids
    assert store.gc(keep=2) == [] and versions[0] == store.current()


def test_gc_uses_the_store_default_keep(client) -> None:
    store = IndexStore(client, "ads", keep=1)
    for s in range(3):
        store.publish(small_index(s), version=f"v{s}")
    assert sorted(store.gc()) == ["v0", "v1"] and store.versions() == ["v2"]


def test_gc_removes_leftovers_of_dead_publishes_and_leaves_live_ones(store: IndexStore, client) -> None:
    store.publish(small_index(), version="v1")
    client.set(store.manifest_key("dead"), json.dumps({"n_chunks": 2}))  # no heartbeat: its publisher is gone
    client.set(store.chunk_key("dead", 0), b"x")
    client.set(store.heartbeat_key("inflight"), b"1", px=60_000)
    client.set(store.manifest_key("inflight"), json.dumps({"created_at": "2000-01-01T00:00:00+00:00"}))
    assert store.gc() == ["dead"]
    assert not [k for k in keys(client) if ":v:dead:" in k]
    assert client.exists(store.manifest_key("inflight")) and store.current() == "v1"


def test_names_and_versions_cannot_break_the_key_layout(client) -> None:
    for bad in ("a:b", "a*", "", "x y"):
        with pytest.raises(ValueError, match="must match"):
            IndexStore(client, bad)
    with pytest.raises(ValueError, match="must match"):
        IndexStore(client, "ads").publish(small_index(), version="v:1")
    with pytest.raises(ValueError, match="chunk_bytes"):
        IndexStore(client, "ads", chunk_bytes=0)
