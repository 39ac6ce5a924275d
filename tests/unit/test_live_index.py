"""LiveIndex refresh decisions on fakeredis: what is swapped in, what is refused for good, what is retried."""

from __future__ import annotations

import logging
import re

import fakeredis
import numpy as np
import pytest
import redis

from hlm.index import AdIndex
from hlm.live_index import LiveIndex
from hlm.store import IndexStore, StoreError

N, D_MODEL = 50, 8


def small_index(seed: int = 0, space: str = "space-a") -> AdIndex:
    x = np.random.default_rng(seed).standard_normal((N, D_MODEL)).astype(np.float32)  # (N, d)
    return AdIndex.build([f"ad-{seed}-{i}" for i in range(N)], x / np.linalg.norm(x, axis=1, keepdims=True), space)


@pytest.fixture
def store() -> IndexStore:
    return IndexStore(fakeredis.FakeRedis(), "ads", chunk_bytes=1024)


@pytest.fixture
def live(store: IndexStore) -> LiveIndex:
    """A LiveIndex already serving version v1 (seed 0)."""
    store.publish(small_index(0), version="v1")
    live = LiveIndex(store, "space-a")
    assert live.refresh() and live.status()["version"] == "v1"
    return live


def point_current_at(store: IndexStore, version: str) -> None:
    """What an operator does with redis-cli: SET current and PUBLISH, skipping rollback()'s completeness check."""
    store.client.set(store.current_key, version)
    store.client.publish(store.channel, version)


def served_version(live: LiveIndex) -> str:
    return live.search(np.ones((1, D_MODEL), dtype=np.float32), 3)[1]


def test_a_new_version_is_swapped_in(live: LiveIndex, store: IndexStore) -> None:
    store.publish(small_index(1), version="v2")
    assert live.refresh() and served_version(live) == "v2"
    assert not live.refresh()  # nothing moved: no reload


def test_a_version_whose_manifest_is_missing_is_refused_once_with_its_reason_logged(
        live: LiveIndex, store: IndexStore, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    # Given a published version whose manifest was deleted, and current pointed back at it by hand
    store.publish(small_index(1), version="v2")
    store.client.delete(store.manifest_key("v1"))
    assert live.refresh()
    point_current_at(store, "v1")
    # When the replica refreshes
    with caplog.at_level(logging.ERROR, logger="hlm.live_index"):
        assert not live.refresh()
    # Then v1 is refused with a reason that names the missing manifest, logged, and v2 keeps serving
    reason = live.status()["refused"]["v1"]
    assert "no hlm:ads:v:v1:manifest" in reason and live.status()["last_error"] == reason
    assert [r.getMessage() for r in caplog.records] == [f"refused version v1, still serving v2: {reason}"]
    assert served_version(live) == "v2"
    # And it is not fetched again while current stays on it
    monkeypatch.setattr(store, "load", lambda *a, **k: pytest.fail("a refused version was fetched again"))
    assert not live.refresh()


@pytest.mark.parametrize("breakage, reason", [
    (lambda s: s.client.set(s.manifest_key("v2"), b"{not json"), "manifest is not valid JSON"),
    (lambda s: s.client.delete(s.chunk_key("v2", 0)), r"chunk\(s\) \[0\]"),
    (lambda s: s.client.setrange(s.chunk_key("v2", 1), 10, b"\xff\xff"), "sha256"),
])
def test_a_broken_version_is_refused_and_the_old_one_keeps_serving(live: LiveIndex, store: IndexStore,
                                                                    breakage, reason: str) -> None:
    store.publish(small_index(1), version="v2")
    breakage(store)
    assert not live.refresh()
    assert served_version(live) == "v1" and list(live.status()["refused"]) == ["v2"]
    assert re.search(reason, live.status()["refused"]["v2"])


def test_an_index_of_another_space_is_refused(live: LiveIndex, store: IndexStore) -> None:
    store.publish(small_index(1, space="space-b"), version="v2")
    assert not live.refresh()
    assert served_version(live) == "v1" and "space-b" in live.status()["refused"]["v2"]


def test_a_student_of_another_space_says_why_it_has_nothing_to_search(store: IndexStore) -> None:
    # Given only an index of the teacher's space, and a replica whose student is in another space (student-default's)
    store.publish(small_index(0, space="teacher-space"), version="v1")
    live = LiveIndex(store, "student-own-space")
    # When it refreshes and a request comes in
    assert not live.refresh()
    # Then the request's error (a 503 in serving) names the refused version, both spaces and the student to serve
    with pytest.raises(StoreError) as refused:
        served_version(live)
    why = str(refused.value)
    assert "no version loaded yet; refused version v1" in why
    assert "teacher-space" in why and "student-own-space" in why and "not student-default" in why


def test_redis_trouble_is_retried_not_refused(live: LiveIndex, store: IndexStore,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    store.publish(small_index(1), version="v2")
    def unreachable(*args, **kwargs):
        raise redis.ConnectionError("Connection refused (injected)")

    monkeypatch.setattr(store.client, "get", unreachable)
    assert not live.refresh()
    assert live.status()["refused"] == {} and "injected" in live.status()["last_error"]
    monkeypatch.undo()
    assert live.refresh() and served_version(live) == "v2" and live.status()["last_error"] is None


def test_the_poll_loop_survives_an_unexpected_error(live: LiveIndex, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []

    def refresh() -> bool:
        calls.append(1)
        if len(calls) == 1:
            raise KeyError("n_chunks")  # say, a manifest written by a future format
        live.stop()
        return False

    monkeypatch.setattr(live, "refresh", refresh)
    live.poll_s = 0.01
    live._poll_loop()  # returns once stopped
    assert len(calls) == 2 and "KeyError" in live.status()["last_error"]
    assert served_version(live) == "v1"


@pytest.mark.parametrize("factory", ["Flat", "HNSW16"])
def test_a_batch_with_a_k_per_row_gets_what_each_row_gets_alone_from_one_version(store: IndexStore, factory: str):
    # Given a live index and queries asking for different k
    x = np.random.default_rng(3).standard_normal((N, D_MODEL)).astype(np.float32)  # (N, d)
    store.publish(AdIndex.build([f"ad-{i}" for i in range(N)], x / np.linalg.norm(x, axis=1, keepdims=True),
                                "space-a", factory), version="v1")
    live = LiveIndex(store, "space-a")
    live.refresh()
    q_emb = np.random.default_rng(4).standard_normal((6, D_MODEL)).astype(np.float32)  # (B, d)
    ks = [3, 10, 3, 1, 10, 500]
    # When the batch is searched at once
    hits, version = live.search(q_emb, ks)
    # Then every row equals the row searched alone (the slow reference), all from the one version
    alone = [live.search(q_emb[i:i + 1], k) for i, k in enumerate(ks)]
    assert hits == [h[0] for h, _ in alone] and {v for _, v in alone} == {version} == {"v1"}
    assert [len(h) for h in hits[:5]] == [3, 10, 3, 1, 10] and len(hits[5]) <= N  # HNSW may not fill k = N


def test_a_batch_with_a_k_count_that_does_not_match_its_rows_is_an_error(live: LiveIndex):
    with pytest.raises(ValueError, match="2 values of k for 3 queries"):
        live.search(np.ones((3, D_MODEL), dtype=np.float32), [1, 2])
