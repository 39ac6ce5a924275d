"""Redis SIGKILLed in the middle of a publish: `current` still names the old, complete version after Redis comes
back, the publish fails with a clear error, and a rerun succeeds.

The server runs with the persistence lines of the shipped production config (infra/kuberay/redis.yaml: an
append-only file fsync'ed on every write): a kill then loses no acknowledged write, so what survives the
restart is exactly what the publish had committed.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np
import pytest
import redis

from hlm.index import AdIndex
from hlm.redis_client import redis_client
from hlm.store import IndexStore, PublishError
from tests.conftest import DurableRedis

pytestmark = [pytest.mark.integration, pytest.mark.reliability]


def flat_index(seed: int, n: int = 3000, d: int = 32) -> AdIndex:
    x = np.random.default_rng(seed).standard_normal((n, d)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return AdIndex.build([f"ad-{seed}-{i}" for i in range(n)], x, "space-a", "Flat")


def kill_at_chunk(store: IndexStore, server: DurableRedis, n: int) -> Callable[[], None]:
    """Make the server die just before the publish writes chunk `n` (the SET then meets a dead socket)."""
    real_set = store.client.set

    def set_(key, value, *args, **kwargs):
        if key == store.chunk_key(key.split(":v:")[1].split(":")[0], n):
            server.kill()
        return real_set(key, value, *args, **kwargs)

    store.client.set = set_
    return lambda: setattr(store.client, "set", real_set)


def kill_before_commit(store: IndexStore, server: DurableRedis) -> Callable[[], None]:
    """Make the server die after every chunk is written and verified, just before the MULTI/EXEC."""
    real_commit = store._commit

    def commit(version: str, based_on: str | None) -> None:
        server.kill()
        real_commit(version, based_on)

    store._commit = commit
    return lambda: setattr(store, "_commit", real_commit)


@pytest.mark.parametrize("kill", ["while writing chunks", "before the final MULTI/EXEC"])
def test_redis_killed_mid_publish_keeps_the_old_version_current_and_a_rerun_succeeds(durable_redis, kill,
                                                                                    record_property):
    store = IndexStore(redis_client(durable_redis.url), "ads", chunk_bytes=16 * 1024, heartbeat_s=1)
    old = store.publish(flat_index(0))
    undo = kill_at_chunk(store, durable_redis, 5) if kill == "while writing chunks" else kill_before_commit(
        store, durable_redis)
    with pytest.raises(PublishError, match=r"publishing ads version .*(current is unchanged|whether it landed)"):
        store.publish(flat_index(1))
    undo()

    durable_redis.start()  # same folder: the append-only file replays every acknowledged write
    store = IndexStore(redis_client(durable_redis.url), "ads", chunk_bytes=16 * 1024, heartbeat_s=1)
    assert store.current() == old and store.versions() == [old]
    assert store.load().ids == flat_index(0).ids  # complete: every chunk is there and its sha256 matches
    record_property("current_after_restart", "old version")
    while list(store.client.scan_iter(match="hlm:ads:v:*:writing")):  # the dead publish's heartbeat runs out
        time.sleep(0.1)
    store.gc()  # the dead publish's leftovers (its cleanup could not reach Redis)
    assert {k.split(b":")[3].decode() for k in store.client.scan_iter(match="hlm:ads:v:*")} == {old}

    new = store.publish(flat_index(1))
    assert store.current() == new and store.load().ids == flat_index(1).ids


def test_a_killed_redis_is_a_clear_publish_error_not_a_hang(durable_redis):
    store = IndexStore(redis_client(durable_redis.url), "ads")
    durable_redis.kill()
    with pytest.raises(PublishError, match="current is unchanged.*ConnectionError"):
        store.publish(flat_index(2))
    with pytest.raises(redis.ConnectionError):
        store.client.ping()
