"""Redis is not trusted blindly (issue #20, item 6): on a real redis-server, a reader with a manifest key accepts
only versions whose manifest was signed with that key, and no manifest makes a reader allocate or fetch without
bound. The attacker here can write to Redis (as anyone holding the writer's password could) but has no key.

The key reaches the stores the way it reaches pods, through the environment ($HLM_MANIFEST_KEY), never an
argument: that is what a replica and a job see, and it lets these tests run unchanged against older code.
"""

from __future__ import annotations

import hashlib
import json
import uuid
from collections.abc import Iterator

import numpy as np
import pytest
import redis

from hlm.index import AdIndex
from hlm.live_index import LiveIndex
from hlm.redis_client import redis_client
from hlm.store import IndexStore, IntegrityError

pytestmark = [pytest.mark.integration, pytest.mark.reliability]
KEY = "k" * 8 + "0123456789abcdef0123456789abcdef"  # 40 bytes, as from a Secret
CHUNK = 16 * 1024


def flat_index(seed: int, n: int = 2000, d: int = 32) -> AdIndex:
    x = np.random.default_rng(seed).standard_normal((n, d)).astype(np.float32)  # (N, d)
    return AdIndex.build([f"ad-{seed}-{i}" for i in range(n)], x / np.linalg.norm(x, axis=1, keepdims=True),
                         "space-a", "Flat")


@pytest.fixture
def client(redis_url: str) -> Iterator[redis.Redis]:
    r = redis_client(redis_url)
    yield r
    r.close()


@pytest.fixture
def name() -> str:
    return f"sig-{uuid.uuid4().hex[:8]}"


def keyed_store(client: redis.Redis, name: str, monkeypatch: pytest.MonkeyPatch) -> IndexStore:
    """A store built the way jobs and replicas build one, with the manifest key in their environment."""
    monkeypatch.setenv("HLM_MANIFEST_KEY", KEY)
    store = IndexStore(client, name, chunk_bytes=CHUNK)
    monkeypatch.delenv("HLM_MANIFEST_KEY")
    return store


def replica(store: IndexStore) -> LiveIndex:
    return LiveIndex(store, "space-a", poll_s=60)


def test_a_signed_version_loads_and_its_manifest_carries_the_signature(client, name, monkeypatch) -> None:
    store = keyed_store(client, name, monkeypatch)
    version = store.publish(flat_index(0))
    manifest = json.loads(client.get(store.manifest_key(version)))
    assert manifest["signature"].startswith("hmac-sha256:") and manifest["index"] == name
    live = replica(store)
    assert live.refresh() and live.status()["version"] == version
    assert store.load().ids == flat_index(0).ids


def test_a_chunk_swapped_together_with_its_sha256_is_refused_and_the_replica_keeps_its_version(
        client, name, monkeypatch, record_property) -> None:
    # Given a replica with a key serving a signed version, and a second signed version
    store = keyed_store(client, name, monkeypatch)
    good = store.publish(flat_index(0))
    live = replica(store)
    assert live.refresh()
    target = store.publish(flat_index(1))
    # When someone without the key swaps chunk 8 for other valid bytes and writes the matching sha256 into the
    # manifest (sha256 alone now passes: it proves integrity, not origin)
    forged_blob, _ = flat_index(2).to_bytes()
    blob = bytearray(flat_index(1).to_bytes()[0])
    blob[8 * CHUNK:9 * CHUNK] = forged_blob[8 * CHUNK:9 * CHUNK]
    client.set(store.chunk_key(target, 8), bytes(blob[8 * CHUNK:9 * CHUNK]))
    manifest = json.loads(client.get(store.manifest_key(target)))
    manifest["sha256"] = hashlib.sha256(blob).hexdigest()
    client.set(store.manifest_key(target), json.dumps(manifest, sort_keys=True))
    # Then loading it is refused for its signature, and the replica marks it refused and keeps serving `good`
    with pytest.raises(IntegrityError, match=rf"version {target}: the manifest's signature does not match"):
        store.load(target)
    assert not live.refresh()
    assert live.status()["version"] == good and "signature does not match" in live.state.refused[target]
    record_property("forged_chunk_with_matching_sha256", "refused by signature; replica kept its version")


def test_an_unsigned_version_is_refused_when_a_key_is_configured(client, name, monkeypatch) -> None:
    # Given a signed version served, then a version published by a writer without the key (unsigned)
    store = keyed_store(client, name, monkeypatch)
    good = store.publish(flat_index(0))
    live = replica(store)
    assert live.refresh()
    unsigned = IndexStore(client, name, chunk_bytes=CHUNK).publish(flat_index(3))
    assert "signature" not in json.loads(client.get(store.manifest_key(unsigned)))
    # Then a reader with the key refuses it, the replica keeps `good`, and a rollback onto it is refused too
    with pytest.raises(IntegrityError, match="the manifest is unsigned"):
        store.load(unsigned)
    assert not live.refresh() and live.status()["version"] == good and unsigned in live.state.refused
    with pytest.raises(IntegrityError, match="unsigned"):
        store.rollback(unsigned)


def test_a_signed_manifest_copied_under_another_version_id_is_refused(client, name, monkeypatch) -> None:
    # Given a signed version, copied key by key under a new version id that is then made current
    store = keyed_store(client, name, monkeypatch)
    original = store.publish(flat_index(0))
    copy = "20990101T000000000000Z-c0ffee"
    for key in client.scan_iter(match=f"{store.prefix}:v:{original}:*"):
        client.set(key.decode().replace(original, copy), client.get(key))
    client.lpush(store.versions_key, copy)
    client.set(store.current_key, copy)
    # Then its signature still matches, but it names another version: refused
    with pytest.raises(IntegrityError, match=rf"the manifest is of version '{original}', not '{copy}'"):
        store.load()


def test_an_oversized_n_chunks_is_refused_before_anything_is_allocated_or_fetched(client, name,
                                                                                 record_property) -> None:
    # Given (no key) a manifest whose sizes agree with each other but ask for a million chunks (1 GiB)
    store = IndexStore(client, name, chunk_bytes=CHUNK)
    version = store.publish(flat_index(0))
    manifest = json.loads(client.get(store.manifest_key(version)))
    manifest |= {"n_chunks": 1 << 20, "chunk_bytes": 1024, "size": (1 << 20) * 1024}
    client.set(store.manifest_key(version), json.dumps(manifest))
    fetched: list[str] = []
    real_get = client.get

    def get(key: str) -> bytes | None:
        fetched.append(key)
        assert len(fetched) < 4, "fetched chunks of an out-of-bounds manifest"
        return real_get(key)

    client.get = get
    # Then the load is refused naming the field, having read only the manifest
    with pytest.raises(IntegrityError, match=r"n_chunks 1048576 is outside 0\.\.65536"):
        store.load(version)
    assert fetched == [store.manifest_key(version)]
    record_property("n_chunks_2^20", f"refused; {len(fetched)} key read (the manifest)")
