"""A replica's follower of one base version's delta logs: replay on load, then blocking reads as entries arrive.

It reads the version's own log and its predecessor's (``stream_previous`` in the manifest; see `hlm.deltas` for
why), both after the version's ``stream_position``, into a `hlm.delta_index.DeltaIndex`. The replica builds a
follower and replays it *before* it swaps the version in, so a hot swap never shows a delete undone. Redis errors
propagate to the caller's loop, which keeps what was applied and retries.
"""

from __future__ import annotations

import time

from hlm.delta_index import DeltaIndex
from hlm.deltas import DeltaLog, decode, position
from hlm.events import GROUP, events_key
from hlm.index import AdIndex
from hlm.store import IndexStore


class DeltaFollower:
    def __init__(self, store: IndexStore, version: str, manifest: dict, base: AdIndex) -> None:
        self.store, self.version, self.log = store, version, DeltaLog(store.client, store.name)
        start = position(manifest)
        self.index = DeltaIndex(base, start)
        keys = [self.log.key(version)] + ([self.log.key(p)] if (p := manifest.get("stream_previous")) else [])
        self.cursors = dict.fromkeys(keys, "0-0")  # log key -> last entry id read (entries are not in event order)
        self.lag: dict | None = None
        self.last_error: str | None = None

    @classmethod
    def start(cls, store: IndexStore, version: str, base: AdIndex) -> DeltaFollower:
        follower = cls(store, version, store.manifest(version), base)
        follower.follow(block_ms=None)
        return follower

    def follow(self, block_ms: int | None = 200) -> int:
        """Apply everything after the cursors; with ``block_ms``, wait that long for the first new entry."""
        applied = 0
        while True:
            reply = self.store.client.xread(self.cursors, count=10_000, block=block_ms)
            entries = []
            for key, rows in reply or []:
                key = key.decode() if isinstance(key, bytes) else key
                entries += [decode(f) for _, f in rows]
                self.cursors[key] = rows[-1][0].decode()
            applied += self.index.apply(entries)
            if not entries or block_ms is not None:
                break
        self.lag, self.last_error = self._stream_lag(), None
        return applied

    def _stream_lag(self) -> dict:
        """Events the updater has not written yet: undelivered to its group plus delivered and unacknowledged."""
        groups = self.store.client.xinfo_groups(events_key(self.store.name)) if self.store.client.exists(
            events_key(self.store.name)) else []
        for g in groups:
            if g["name"] in (GROUP, GROUP.encode()):
                return {"undelivered": g.get("lag"), "pending": g["pending"], "at": round(time.time(), 3)}
        return {"undelivered": None, "pending": None, "at": round(time.time(), 3)}

    def status(self) -> dict:
        return {"delta": {**self.index.status(), "last_error": self.last_error}, "stream_lag": self.lag}
