"""Streaming ad updates against a real redis-server: events → updater → delta log → a replica's LiveIndex.

The encoder here is a deterministic text hash (the updater's `encode(texts) -> float32 (n, d)` contract); the
SIGKILL scenario runs the real job with a tiny teacher.
"""

from __future__ import annotations

import hashlib
import threading

import numpy as np
import pytest
import redis

from hlm.deltas import DeltaLog
from hlm.events import AdEventProducer, EventError, dead_letter_key, events_key
from hlm.index import AdIndex
from hlm.live_index import LiveIndex
from hlm.redis_client import redis_client
from hlm.store import IndexStore, StoreUnavailable
from hlm.updater import StreamUpdater

pytestmark = pytest.mark.integration
D, SPACE = 16, "space-s"


def vec(text: str) -> np.ndarray:
    seed = int.from_bytes(hashlib.sha256(text.encode()).digest()[:4], "little")
    x = np.random.default_rng(seed).standard_normal(D).astype(np.float32)
    return x / np.linalg.norm(x)


def encode(texts: list[str]) -> np.ndarray:
    return np.stack([vec(t) for t in texts])  # (n, d)


@pytest.fixture
def env(redis_url: str, request: pytest.FixtureRequest):
    """A fresh index name with a base of 40 ads published (stream position 0-0)."""
    name = f"s{abs(hash(request.node.name)) % 10**8}"
    client = redis_client(redis_url)
    store = IndexStore(client, name)
    ids = [f"ad-{i}" for i in range(40)]
    store.publish(AdIndex.build(ids, encode([f"text {i}" for i in ids]), SPACE), version="v1")
    return store, AdEventProducer(client, name)


def updater(store: IndexStore, consumer: str = "u1") -> StreamUpdater:
    return StreamUpdater(store.client, store.name, encode, SPACE, consumer=consumer, batch_size=8, block_ms=10)


def drain(u: StreamUpdater) -> None:
    u.ensure_group()
    while entries := u.read():
        u.process(entries)


def found(live: LiveIndex, text: str, k: int = 5) -> list[str]:
    return [a for a, _ in live.search(vec(text)[None], k)[0][0]]


def test_malformed_events_go_to_the_dead_letter_stream_with_reasons_and_the_stream_flows(env) -> None:
    store, producer = env
    # Given a producer refuses a bad event itself, and another producer XADDs malformed ones directly
    with pytest.raises(EventError, match="event 0: empty text"):
        producer.send([{"op": "upsert", "ad_id": "x", "text": "  "}])
    key = events_key(store.name)
    producer.upsert("new-1", "fresh lamp")
    for fields in ({"op": "upsert", "text": "no id"}, {"op": "upsert", "ad_id": "e", "text": ""},
                   {"op": "pause", "ad_id": "p"}, {"op": "upsert", "ad_id": "big", "text": "x" * 9000}):
        store.client.xadd(key, fields)
    producer.delete("ad-3")
    # When the updater drains the stream
    u = updater(store)
    drain(u)
    # Then the four land in the dead-letter stream with their reasons, and the good events around them are applied
    reasons = [f[b"reason"].decode() for _, f in store.client.xrange(dead_letter_key(store.name))]
    assert reasons == ["missing field ad_id", "empty text (an upsert needs the ad's text)",
                       "unknown op 'pause' (expected one of upsert, delete)",
                       "text of 9000 chars, over the limit of 8192"]
    log = DeltaLog(store.client, store.name).read("v1")
    assert [(e.op, e.ad_id) for e in log] == [("delete", "ad-3"), ("upsert", "new-1")]  # deletes skip the teacher
    assert store.client.xpending(key, "hlm-updater")["pending"] == 0


def test_a_delete_read_while_upserts_wait_for_the_teacher_is_written_before_they_are_embedded(env) -> None:
    store, producer = env
    producer.send([{"op": "upsert", "ad_id": f"n{i}", "text": f"new {i}"} for i in range(3)])
    u = updater(store)
    u.ensure_group()
    u.take(u.read())  # the upserts wait in the queue, unacked
    producer.delete("ad-5")
    u.take(u.read(block=False))
    log = DeltaLog(store.client, store.name)
    assert [(e.op, e.ad_id) for e in log.read("v1")] == [("delete", "ad-5")]
    assert store.client.xpending(events_key(store.name), "hlm-updater")["pending"] == 3
    u.embed_next()
    assert [(e.op, e.ad_id) for e in log.read("v1")] == [("delete", "ad-5"), ("upsert", "n0"), ("upsert", "n1"),
                                                        ("upsert", "n2")]
    assert store.client.xpending(events_key(store.name), "hlm-updater")["pending"] == 0


def test_a_delete_sent_while_the_teacher_embeds_is_written_before_the_teacher_returns(env) -> None:
    store, producer = env
    busy, release = threading.Event(), threading.Event()

    def slow_teacher(texts: list[str]) -> np.ndarray:
        busy.set()
        assert release.wait(20), "the test never released the teacher"
        return encode(texts)

    u = StreamUpdater(store.client, store.name, slow_teacher, SPACE, consumer="u1", batch_size=8, block_ms=10)
    stop, log = threading.Event(), DeltaLog(store.client, store.name)
    t = threading.Thread(target=u.run, args=(stop,), kwargs={"lease_s": 5, "retry_s": 0.1})
    producer.send([{"op": "upsert", "ad_id": "n0", "text": "new 0"}])
    t.start()
    try:
        assert busy.wait(10)
        producer.delete("ad-5")  # while the teacher holds the upsert
        for _ in range(200):
            if log.read("v1"):
                break
            stop.wait(0.02)
        assert [(e.op, e.ad_id) for e in log.read("v1")] == [("delete", "ad-5")]
        release.set()
        for _ in range(200):
            if len(log.read("v1")) == 2:
                break
            stop.wait(0.02)
        assert [(e.op, e.ad_id) for e in log.read("v1")] == [("delete", "ad-5"), ("upsert", "n0")]
    finally:
        release.set()
        stop.set()
        t.join()
    assert store.client.xpending(events_key(store.name), "hlm-updater")["pending"] == 0


def test_a_text_the_teacher_fails_on_goes_to_the_dead_letter_stream_and_the_rest_of_its_batch_is_applied(env):
    store, producer = env
    producer.send([{"op": "upsert", "ad_id": f"n{i}", "text": f"new {i}"} for i in range(3)]
                  + [{"op": "upsert", "ad_id": "poison", "text": "crashes the teacher"}])

    def fragile(texts: list[str]) -> np.ndarray:  # a teacher that fails on one text, as a batch and alone
        if "crashes the teacher" in texts:
            raise RuntimeError("tokenizer blew up")
        return encode(texts)

    u = StreamUpdater(store.client, store.name, fragile, SPACE, consumer="u1", batch_size=8, block_ms=10)
    drain(u)
    dead = store.client.xrange(dead_letter_key(store.name))
    assert [(f[b"ad_id"], f[b"reason"].decode()) for _, f in dead] == [
        (b"poison", "the teacher failed on this text: RuntimeError: tokenizer blew up")]
    log = DeltaLog(store.client, store.name).read("v1")
    assert sorted(e.ad_id for e in log) == ["n0", "n1", "n2"]
    assert store.client.xpending(events_key(store.name), "hlm-updater")["pending"] == 0


def test_a_teacher_that_fails_on_every_text_leaves_the_events_pending(env):
    store, producer = env
    producer.send([{"op": "upsert", "ad_id": f"n{i}", "text": f"new {i}"} for i in range(3)])

    def down(texts: list[str]) -> np.ndarray:
        raise RuntimeError("the actor pool is gone")

    u = StreamUpdater(store.client, store.name, down, SPACE, consumer="u1", batch_size=8, block_ms=10)
    u.ensure_group()
    with pytest.raises(RuntimeError, match="actor pool"):
        u.process(u.read())
    assert store.client.xlen(dead_letter_key(store.name)) == 0
    assert store.client.xpending(events_key(store.name), "hlm-updater")["pending"] == 3


def test_a_batch_written_but_not_acked_is_replayed_by_the_next_updater_without_duplicates(env, monkeypatch) -> None:
    store, producer = env
    ids = producer.send([{"op": "upsert", "ad_id": f"n{i}", "text": f"new {i}"} for i in range(5)]
                        + [{"op": "delete", "ad_id": "ad-1"}])
    # Given an updater that dies after writing its upserts and before their XACK (its delete was written and acked)
    first = updater(store, "dies")
    first.ensure_group()
    first.take(first.read())
    monkeypatch.setattr(first.client, "xack", lambda *a: (_ for _ in ()).throw(SystemExit("killed")))
    with pytest.raises(SystemExit):
        first.embed_next()
    monkeypatch.undo()
    assert store.client.xpending(events_key(store.name), "hlm-updater")["pending"] == 5
    # When the next updater starts: it claims the dead one's pending events first
    second = updater(store, "next")
    drain(second)
    # Then each event is in the log exactly once, and nothing is pending
    log = DeltaLog(store.client, store.name).read("v1")
    assert sorted(e.event_id for e in log) == sorted(ids) and len(log) == len(ids)
    assert second.counts.events == 5 and second.counts.written == 0
    assert store.client.xpending(events_key(store.name), "hlm-updater")["pending"] == 0


def test_a_replica_applies_deletes_and_upserts_and_a_restarted_one_catches_up_to_the_same_results(env) -> None:
    store, producer = env
    live = LiveIndex(store, SPACE)
    assert live.refresh()
    assert found(live, "text ad-7")[0] == "ad-7"
    producer.delete("ad-7")
    producer.upsert("ad-8", "an edited ad")
    producer.upsert("brand-new", "cordless drill")
    drain(updater(store))
    live.snapshot.deltas.follow(block_ms=None)
    assert "ad-7" not in found(live, "text ad-7", k=40)
    assert found(live, "an edited ad")[0] == "ad-8" and "ad-8" not in found(live, "text ad-8", k=3)
    assert found(live, "cordless drill")[0] == "brand-new"
    assert len(live.search(vec("x")[None], 40)[0][0]) == 40  # deep enough: k remain after the tombstones
    # A replica started now replays the log and answers the same
    fresh = LiveIndex(store, SPACE)
    assert fresh.refresh()
    for text in ("text ad-7", "an edited ad", "cordless drill", "text ad-20"):
        assert fresh.search(vec(text)[None], 10)[0] == live.search(vec(text)[None], 10)[0]
    status = fresh.status()
    assert status["delta"]["tombstones"] == 3 and status["delta"]["upserts"] == 2
    assert status["stream_lag"]["pending"] == 0 and status["stream_lag"]["undelivered"] == 0


def test_a_delete_stays_invisible_across_a_hot_swap_and_the_new_base_gets_the_tail(env) -> None:
    store, producer = env
    live = LiveIndex(store, SPACE, poll_s=0.05)
    live.refresh()
    live.start()  # the follower and the poll loop run as on a replica, under 4 searching threads
    u = updater(store)
    seen_gone, came_back, stop = threading.Event(), [], threading.Event()

    def search_load() -> None:
        while not stop.is_set():
            hits = found(live, "text ad-5", k=40)
            if "ad-5" not in hits:
                seen_gone.set()
            elif seen_gone.is_set():
                came_back.append(live.status()["version"])

    load = [threading.Thread(target=search_load) for _ in range(4)]
    for t in load:
        t.start()
    producer.delete("ad-5")
    drain(u)
    assert seen_gone.wait(10)
    # Given a new base built before that delete (position 0-0: it still holds ad-5), published by the refresh
    ids = [f"ad-{i}" for i in range(40)]
    store.publish(AdIndex.build(ids, encode([f"text {i}" for i in ids]), SPACE), version="v2",
                  extra={"stream_position": "0-0", "stream_previous": "v1"})
    # When the replica swaps (its poll loop) before the updater has seen v2
    for _ in range(200):
        if live.status()["version"] == "v2":
            break
        stop.wait(0.05)
    stop.wait(0.3)
    stop.set()
    live.stop()
    for t in load:
        t.join()
    # Then no search returned ad-5 after its delete was first seen, before or after the swap (the replica read
    # v1's tail), and the updater then copies the tail into v2's log
    assert live.status()["version"] == "v2" and came_back == []
    assert "ad-5" not in found(live, "text ad-5", k=40)
    producer.upsert("late", "after the swap")
    drain(u)
    assert [e.ad_id for e in DeltaLog(store.client, store.name).read("v2")] == ["ad-5", "late"]


def test_a_delta_in_another_space_is_refused(env) -> None:
    store, producer = env
    live = LiveIndex(store, SPACE)
    live.refresh()
    other = StreamUpdater(store.client, store.name, encode, "space-other", consumer="o", block_ms=10)
    producer.upsert("z", "other space")
    other.ensure_group()
    with pytest.raises(Exception, match="space-other: no deltas are written"):
        other.process(other.read())
    # a log entry written in another space anyway (e.g. an old updater) is refused by the replica
    log = DeltaLog(store.client, store.name)
    from hlm.deltas import DeltaEntry
    store.client.xadd(log.key("v1"), DeltaEntry("9999999999999-0", "upsert", "z", vec("q"), "space-other").fields(),
                      id="9999999999999-0")
    live.snapshot.deltas.follow(block_ms=None)
    assert live.status()["delta"]["refused"] == 1 and "z" not in found(live, "q")


def test_redis_unreachable_the_updater_retries_and_loses_nothing(env) -> None:
    store, producer = env
    ids = producer.send([{"op": "delete", "ad_id": f"ad-{i}"} for i in range(3)])
    u = updater(store)
    u.ensure_group()
    u.read()  # delivered, then Redis goes away before the write
    broken = StreamUpdater(redis.Redis(port=1, socket_connect_timeout=0.2), store.name, encode, SPACE,
                           consumer="u1")
    with pytest.raises(StoreUnavailable):
        broken.process([(i.encode(), {b"op": b"delete", b"ad_id": b"ad-0"}) for i in ids])
    stop = threading.Event()
    t = threading.Thread(target=u.run, args=(stop,), kwargs={"lease_s": 2, "retry_s": 0.1})
    u._claim_from = "0-0"  # what run() does after an error: the delivered events are taken again
    t.start()
    try:
        for _ in range(100):
            if len(DeltaLog(store.client, store.name).read("v1")) == 3:
                break
            stop.wait(0.05)
    finally:
        stop.set()
        t.join()
    assert sorted(e.event_id for e in DeltaLog(store.client, store.name).read("v1")) == sorted(ids)


def test_the_ad_events_cli_sends_json_lines_and_refuses_a_bad_file_naming_the_row(env, redis_url, tmp_path,
                                                                                   capsys) -> None:
    from pipelines.ad_events import main

    store, _ = env
    good, bad = tmp_path / "changes.jsonl", tmp_path / "bad.jsonl"
    good.write_text('{"op": "upsert", "ad_id": "n1", "text": "oak door"}\n{"op": "delete", "ad_id": "ad-1"}\n')
    bad.write_text('{"ad_id": "n2", "text": "white paint"}\n{"op": "upsert", "ad_id": "n3", "text": ""}\n')
    argv = ["--index", store.name, "--redis-url", redis_url]
    assert main(["--input", str(bad), *argv]) == 2
    assert f"{bad} row 1: empty text" in capsys.readouterr().err
    assert main(["--input", str(good), *argv]) == 0
    assert f"sent 2 events (1 deletes) to hlm:{store.name}:ad_events" in capsys.readouterr().out
    sent = store.client.xrange(events_key(store.name))
    assert [(f[b"op"], f[b"ad_id"]) for _, f in sent] == [(b"upsert", b"n1"), (b"delete", b"ad-1")]


def test_redis_unreachable_a_replica_keeps_its_deltas_and_catches_up_when_it_returns(env, monkeypatch) -> None:
    store, producer = env
    live = LiveIndex(store, SPACE, poll_s=0.05)
    live.refresh()
    u = updater(store)
    producer.delete("ad-9")
    drain(u)
    live.snapshot.deltas.follow(block_ms=None)
    # Given Redis stops answering the replica's follower while it runs
    real_xread = store.client.xread

    def unreachable(*a, **k):
        raise redis.ConnectionError("Redis is unreachable")

    monkeypatch.setattr(store.client, "xread", unreachable)
    live.start()
    try:
        for _ in range(100):
            if live.status()["delta"]["last_error"]:
                break
            threading.Event().wait(0.02)
        # Then it keeps what it applied, and says why it is not following
        assert "unreachable" in live.status()["delta"]["last_error"]
        assert "ad-9" not in found(live, "text ad-9", k=40)
        # And when Redis returns, it applies what was written meanwhile
        producer.delete("ad-10")
        drain(u)
        monkeypatch.setattr(store.client, "xread", real_xread)
        for _ in range(200):
            if "ad-10" not in found(live, "text ad-10", k=40):
                break
            threading.Event().wait(0.02)
        assert "ad-10" not in found(live, "text ad-10", k=40) and "ad-9" not in found(live, "text ad-9", k=40)
    finally:
        live.stop()
