"""IndexStore against a real redis-server: round trip, pub/sub, tampering, space checks, interrupted publishes."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from functools import cache

import numpy as np
import pytest
import redis

import hlm.index
from hlm.index import AdIndex
from hlm.redis_client import redis_client
from hlm.space import SpaceMismatch
from hlm.store import IndexStore, IntegrityError, PublishError
from tests.conftest import received

pytestmark = pytest.mark.integration
N, D_MODEL = 2000, 32


def clustered(seed: int) -> np.ndarray:
    """(N, d) unit vectors around 32 random centres."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((32, D_MODEL)).astype(np.float32)  # (C, d)
    x = centres[rng.integers(0, 32, N)] + 0.5 * rng.standard_normal((N, D_MODEL)).astype(np.float32)  # (N, d)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@cache  # built once per (seed, space); tests only read it
def ivf_index(seed: int = 0, space: str = "space-a") -> AdIndex:
    return AdIndex.build([f"ad-{seed}-{i}" for i in range(N)], clustered(seed), space, "IVF16,Flat", nprobe=4)


@pytest.fixture
def client(redis_url: str) -> Iterator[redis.Redis]:
    r = redis_client(redis_url)
    yield r
    r.close()


@pytest.fixture
def store(client: redis.Redis) -> IndexStore:
    """A store under a fresh index name, so tests share the session's redis-server without interfering."""
    return IndexStore(client, f"test-{uuid.uuid4().hex[:10]}", chunk_bytes=16 * 1024)


def version_keys(client: redis.Redis, store: IndexStore, version: str) -> list[bytes]:
    return list(client.scan_iter(match=f"{store.prefix}:v:{version}:*"))


def assert_same_answers(a: AdIndex, b: AdIndex) -> None:
    q = np.random.default_rng(7).standard_normal((8, D_MODEL)).astype(np.float32)  # (B, d)
    for got, want in zip(a.search(q, 10), b.search(q, 10), strict=True):
        np.testing.assert_array_equal(got, want)


def test_publish_then_load_round_trip(store: IndexStore) -> None:
    index = ivf_index()
    version = store.publish(index, source="integration")
    assert store.manifest(version)["n_chunks"] > 1
    loaded = store.load(expected_space="space-a")
    assert (loaded.ids, loaded.space, loaded.factory, loaded.nprobe) == (index.ids, "space-a", "IVF16,Flat", 4)
    assert_same_answers(loaded, index)


def test_a_subscriber_receives_the_new_version_id(store: IndexStore, client: redis.Redis) -> None:
    with client.pubsub(ignore_subscribe_messages=True) as sub:
        sub.subscribe(f"hlm:{store.name}:events")
        v1 = store.publish(ivf_index(0))
        v2 = store.publish(ivf_index(1))
        assert received(sub, 2) == [v1.encode(), v2.encode()]
        store.rollback()
        assert received(sub, 1) == [v1.encode()]


@pytest.mark.reliability
def test_a_tampered_chunk_is_refused_before_deserialising(store: IndexStore, client: redis.Redis,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    # Given two versions, the newest with one byte flipped in its second chunk
    old = store.publish(ivf_index(0))
    new = store.publish(ivf_index(1))
    key = store.chunk_key(new, 1)
    byte = client.getrange(key, 100, 100)
    client.setrange(key, 100, bytes([byte[0] ^ 0xFF]))
    deserialised: list[int] = []
    real = hlm.index.faiss.deserialize_index
    monkeypatch.setattr(hlm.index.faiss, "deserialize_index", lambda buf: deserialised.append(1) or real(buf))
    # When loading it, then it is refused by checksum, never handed to FAISS, and current is unchanged
    n = store.manifest(new)["n_chunks"]
    with pytest.raises(IntegrityError, match=rf"version {new}: sha256 of its {n} chunk\(s\)"):
        store.load()
    assert deserialised == [] and store.current() == new
    # And the previous version still loads (what a replica falls back to)
    assert store.load(old).ids == ivf_index(0).ids and deserialised == [1]


def test_an_index_of_another_space_is_refused(store: IndexStore, client: redis.Redis,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    store.publish(ivf_index(space="space-b"))
    pipelines: list[int] = []
    real_pipeline = client.pipeline
    monkeypatch.setattr(client, "pipeline", lambda *a, **k: pipelines.append(1) or real_pipeline(*a, **k))
    with pytest.raises(SpaceMismatch, match="space-b does not match the expected space space-a"):
        store.load(expected_space="space-a")
    assert pipelines == []  # refused from the manifest, before any chunk was fetched


def _fail_final_multi(monkeypatch: pytest.MonkeyPatch, *, after_exec: bool) -> list[int]:
    """Make the publish's MULTI/EXEC (the one holding a PUBLISH) raise ConnectionError, before or after it runs."""
    calls: list[int] = []
    real_execute = redis.client.Pipeline.execute

    def execute(self: redis.client.Pipeline, raise_on_error: bool = True):
        if self.transaction and any(args[0] == "PUBLISH" for args, _ in self.command_stack):
            calls.append(1)
            if after_exec:
                real_execute(self, raise_on_error)  # the server applies it; only the reply is lost
            self.reset()
            raise redis.ConnectionError("Connection reset by peer (injected)")
        return real_execute(self, raise_on_error)

    monkeypatch.setattr(redis.client.Pipeline, "execute", execute)
    return calls


def test_a_publish_interrupted_before_the_final_multi_keeps_current_and_a_rerun_succeeds(
        store: IndexStore, client: redis.Redis, monkeypatch: pytest.MonkeyPatch) -> None:
    # Given a complete version, and a Redis that drops the connection on the final MULTI/EXEC
    old = store.publish(ivf_index(0))
    calls = _fail_final_multi(monkeypatch, after_exec=False)
    # When publishing, then the failure is a PublishError and current still points to the old version
    with pytest.raises(PublishError, match="final MULTI/EXEC failed .*current is unchanged"):
        store.publish(ivf_index(1), version="v-failed")
    assert calls == [1]
    assert store.current() == old and store.versions() == [old]
    assert version_keys(client, store, "v-failed") == []  # confirmed not committed, so its keys were removed
    assert store.load().ids == ivf_index(0).ids
    # And once Redis behaves, a rerun publishes
    monkeypatch.undo()
    new = store.publish(ivf_index(1))
    assert store.current() == new and store.versions() == [new, old]
    assert_same_answers(store.load(), ivf_index(1))


def test_a_publish_interrupted_while_writing_chunks_leaves_nothing_behind(
        store: IndexStore, client: redis.Redis, monkeypatch: pytest.MonkeyPatch) -> None:
    old = store.publish(ivf_index(0))
    real_set = client.set

    def flaky_set(key, value, *args, **kwargs):
        if key.endswith(":chunk:2"):
            raise redis.ConnectionError("Connection reset by peer (injected)")
        return real_set(key, value, *args, **kwargs)

    monkeypatch.setattr(client, "set", flaky_set)
    with pytest.raises(PublishError, match="current is unchanged.*ConnectionError"):
        store.publish(ivf_index(1), version="v-partial")
    assert store.current() == old and version_keys(client, store, "v-partial") == []
    monkeypatch.undo()
    assert store.publish(ivf_index(1), version="v-partial") == "v-partial" == store.current()


def test_a_lost_exec_reply_is_still_a_successful_publish(store: IndexStore, client: redis.Redis,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    old = store.publish(ivf_index(0))
    _fail_final_multi(monkeypatch, after_exec=True)
    new = store.publish(ivf_index(1))
    monkeypatch.undo()
    assert store.current() == new and store.versions() == [new, old]
    assert_same_answers(store.load(), ivf_index(1))


def test_rollback_and_gc_against_real_redis(store: IndexStore, client: redis.Redis) -> None:
    v = [store.publish(ivf_index(s), version=f"v{s}") for s in range(4)]
    assert store.rollback() == "v2"
    assert_same_answers(store.load(), ivf_index(2))
    assert store.rollback(to="v0") == "v0"
    assert sorted(store.gc(keep=2)) == ["v1"]  # v3, v2 are the newest two; v0 is current
    assert store.versions() == ["v3", "v2", "v0"] and version_keys(client, store, "v1") == []
    assert store.load().ids == ivf_index(0).ids
    assert store.rollback(to=v[3]) == "v3" and sorted(store.gc(keep=1)) == ["v0", "v2"]
    assert store.versions() == ["v3"]
    assert {k.decode().split(":v:")[1].split(":")[0] for k in client.scan_iter(match=f"{store.prefix}:v:*")} == {"v3"}



def test_publish_index_stores_the_search_defaults_the_loaded_version_searches_with(tmp_path, redis_url: str,
                                                                                   client: redis.Redis) -> None:
    from hlm.data import write_embeddings
    from pipelines import publish_index

    ids, emb = [f"ad-{i}" for i in range(N)], clustered(3)
    write_embeddings(tmp_path / "ads.parquet", ids, emb, {"fingerprint": "space-p", "dim": D_MODEL})
    name = f"test-{uuid.uuid4().hex[:10]}"
    factory = f"IVF16,PQ{D_MODEL // 4}x4fs,Refine(SQ8)"
    assert publish_index.main(["--embeddings", str(tmp_path / "ads.parquet"), "--index", name, "--factory", factory,
                               "--nprobe", "16", "--k-factor", "8", "--redis-url", redis_url]) == 0
    loaded = IndexStore(client, name).load(expected_space="space-p")
    assert (loaded.factory, loaded.nprobe, loaded.k_factor) == (factory, 16, 8.0)
    exact = AdIndex.build(ids, emb, "space-p", "Flat")
    assert loaded.recall_at_k(exact, emb[:200], 10) >= 0.9  # every list probed, candidates re-scored
    assert publish_index.main(["--embeddings", str(tmp_path / "ads.parquet"), "--index", name, "--factory", "Flat",
                               "--k-factor", "8", "--redis-url", redis_url]) == 2  # k_factor needs a refining index


def test_publish_index_takes_the_refresh_section_from_config_and_set(tmp_path, redis_url: str,
                                                                     client: redis.Redis, capsys) -> None:
    from hlm.data import write_embeddings
    from pipelines import publish_index

    write_embeddings(tmp_path / "ads.parquet", [f"ad-{i}" for i in range(N)], clustered(4),
                     {"fingerprint": "space-c", "dim": D_MODEL})
    name, other = (f"test-{uuid.uuid4().hex[:10]}" for _ in range(2))
    config = tmp_path / "publish.yaml"
    config.write_text(f"refresh:\n  index: {name}\n  factory: HNSW16\n  ef_search: 40\n  redis_url: {redis_url}\n")
    common = ["--config", str(config), "--embeddings", str(tmp_path / "ads.parquet")]
    # a --set gate threshold no index can meet refuses the publish: the threshold reached the gate
    assert publish_index.main([*common, "--set", "refresh.min_recall=1.01"]) == 1
    assert "nothing published" in capsys.readouterr().err and IndexStore(client, name).versions() == []
    # the config's index name, factory and search default reach the published version
    assert publish_index.main([*common, "--set", "refresh.recall_sample=50"]) == 0
    loaded = IndexStore(client, name).load(expected_space="space-c")
    assert (loaded.factory, loaded.ef_search) == ("HNSW16", 40)
    # and a flag is a shortcut for its --set, winning over it
    assert publish_index.main([*common, "--set", f"refresh.index={name}", "--index", other]) == 0
    assert len(IndexStore(client, other).versions()) == 1 and len(IndexStore(client, name).versions()) == 1
