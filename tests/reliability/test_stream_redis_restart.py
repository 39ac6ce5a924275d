"""Redis SIGKILLed and started again while the updater and a replica follow the event stream: both keep what they
have, retry, and when Redis is back every event, before and after the outage, is applied exactly once.

The server runs with the shipped persistence (append-only file, fsync on every write), so an acknowledged event
or delta entry survives the kill; the encoder is a deterministic text hash (the `encode` contract).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import pytest

from hlm.deltas import DeltaLog
from hlm.events import GROUP, AdEventProducer, events_key
from hlm.index import AdIndex
from hlm.live_index import LiveIndex
from hlm.redis_client import redis_client
from hlm.store import IndexStore
from hlm.updater import StreamUpdater
from tests.conftest import DurableRedis
from tests.integration.test_streaming import SPACE, encode, found

pytestmark = [pytest.mark.integration, pytest.mark.reliability]


def until(condition: Callable[[], bool], timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"timed out after {timeout_s} s waiting for {condition.__doc__}"
        time.sleep(0.05)


def events(first: int) -> list[dict]:
    """Five deletes of base ads and five new ads, numbered from ``first``."""
    return [{"op": "delete", "ad_id": f"ad-{i}"} for i in range(first, first + 5)] + \
        [{"op": "upsert", "ad_id": f"new-{i}", "text": f"new ad {i}"} for i in range(first, first + 5)]


def test_redis_killed_and_restarted_mid_stream_loses_no_event_and_applies_each_once(durable_redis: DurableRedis):
    store = IndexStore(redis_client(durable_redis.url), "ads")
    ids = [f"ad-{i}" for i in range(40)]
    store.publish(AdIndex.build(ids, encode([f"text {i}" for i in ids]), SPACE), version="v1")
    producer = AdEventProducer(store.client, "ads")
    updater = StreamUpdater(store.client, "ads", encode, SPACE, consumer="u1", batch_size=4, block_ms=20)
    replica = LiveIndex(store, SPACE, poll_s=0.2)
    replica.refresh()

    def shows(first: int) -> bool:
        """the replica to show a batch of events: the deletes gone, the new ads found"""
        return all(f"ad-{i}" not in found(replica, f"text ad-{i}", k=40) for i in range(first, first + 5)) and \
            all(found(replica, f"new ad {i}", k=1) == [f"new-{i}"] for i in range(first, first + 5))

    stop = threading.Event()
    thread = threading.Thread(target=updater.run, args=(stop,), kwargs={"lease_s": 10, "retry_s": 0.2})
    sent = producer.send(events(0))
    thread.start()
    replica.start()
    try:
        until(lambda: shows(0))
        # Given Redis dies while both follow the stream
        durable_redis.kill()
        until(lambda: bool(updater.counts.errors) and bool(replica.status()["delta"]["last_error"]))
        # Then the replica keeps serving what it had applied
        assert shows(0)
        # And when Redis is back, the events sent after the outage are applied too
        durable_redis.start()
        sent += AdEventProducer(redis_client(durable_redis.url), "ads").send(events(5))
        until(lambda: shows(5))
    finally:
        stop.set()
        replica.stop()
        thread.join(timeout=30)
    log = DeltaLog(store.client, "ads").read("v1")
    assert sorted(e.event_id for e in log) == sorted(sent)  # each event once: none lost, none written twice
    assert store.client.xpending(events_key("ads"), GROUP)["pending"] == 0
    assert "ConnectionError" in " ".join(updater.counts.errors)  # the outage reached the updater
