"""Which versions of an index stay: ``rollback`` moves ``current`` back, ``gc`` deletes old versions and the
leftovers of dead publishes (orphans). ``hlm.store.IndexStore`` exposes these as its methods.

An orphan is a manifest not in ``versions`` whose publish heartbeat has expired: liveness is judged by Redis's
clock (the heartbeat's PX TTL), never a publisher's, so a publish in flight is never taken for an orphan.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import redis

from hlm.store_errors import IntegrityError, StoreError, redis_errors

if TYPE_CHECKING:
    from hlm.store import IndexStore

logger = logging.getLogger(__name__)


def rollback(store: IndexStore, to: str | None = None) -> str:
    """Point ``current`` at ``to`` (default: the version published before the current one) and announce it."""
    what = f"rolling back {store.name}"

    def move(pipe: redis.client.Pipeline) -> str:
        current = (pipe.get(store.current_key) or b"").decode()
        versions = [v.decode() for v in pipe.lrange(store.versions_key, 0, -1)]
        target = to
        if target is None:
            older = versions[versions.index(current) + 1:] if current in versions else []
            if not older:
                raise StoreError(f"{what}: no version older than {current or None!r} in {versions}")
            target = older[0]
        if target not in versions:
            raise StoreError(f"{what}: {target!r} is not a published version (have {versions})")
        store.manifest(target)  # a manifest readers would refuse (unsigned, forged, out of bounds) says why here
        if not store.is_complete(target):
            raise IntegrityError(f"{what}: version {target} is incomplete in Redis")
        pipe.multi()
        pipe.set(store.current_key, target)
        pipe.publish(store.channel, target)
        logger.info("%s: current %s -> %s", what, current or None, target)
        return target

    with redis_errors(what):
        return store.client.transaction(move, store.current_key, store.versions_key, value_from_callable=True)


def gc(store: IndexStore, keep: int | None = None) -> list[str]:
    """Delete versions beyond the newest ``keep`` (never ``current``) and orphans; returns the deleted ids.

    An orphan is a failed publish's leftover: a manifest, not in ``versions``, and no live heartbeat, so a
    publish still in flight (its heartbeat renewed per chunk) is left alone whatever anyone's clock says.
    """
    keep = store.keep if keep is None else keep
    if keep < 1:
        raise ValueError(f"keep must be >= 1, got {keep}")

    def collect(pipe: redis.client.Pipeline) -> list[str]:
        current = (pipe.get(store.current_key) or b"").decode()
        versions = [v.decode() for v in pipe.lrange(store.versions_key, 0, -1)]
        doomed = [v for v in versions[keep:] if v != current]
        orphans = [v for v in find_orphans(store) if v not in versions and v != current]
        keys = [k for v in doomed + orphans for k in store._version_keys(v)]
        pipe.multi()
        for v in doomed:
            pipe.lrem(store.versions_key, 0, v)
        if keys:
            pipe.delete(*keys)
        return doomed + orphans

    with redis_errors(f"collecting old versions of {store.name}"):
        deleted = store.client.transaction(collect, store.current_key, store.versions_key, value_from_callable=True)
    if deleted:
        logger.info("gc %s: deleted %s (kept the newest %d and current)", store.name, deleted, keep)
    return deleted


def find_orphans(store: IndexStore) -> list[str]:
    """Version ids with a manifest and no live heartbeat (callers drop the published ones)."""
    found = []
    for key in store.client.scan_iter(match=f"{store.prefix}:v:*:manifest", count=1000):
        version = key.decode()[len(store.prefix) + 3:-len(":manifest")]
        if not store.client.exists(store.heartbeat_key(version)):
            found.append(version)
    return found


def delete_orphans(store: IndexStore) -> None:
    """Delete the orphans (not published, not current): the publish path's share of gc."""
    orphans = find_orphans(store)
    published = set(store.versions()) | {store.current()}  # read after the scan: a commit drops its heartbeat
    for version in orphans:  # and joins `versions` in one EXEC, so a just-committed version is seen here
        if version not in published:
            logger.warning("deleting the leftovers of a dead publish of %s: version %s", store.name, version)
            store._delete_quietly(version)
