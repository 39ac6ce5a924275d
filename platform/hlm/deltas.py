"""Per-base-version delta logs in Redis: what changed since a base index was built, ready to search.

Key layout (docs/design.md, "Streaming ad updates")::

    hlm:{index}:v:{ver}:delta      -> Redis Stream, one entry per applied event, entry id = the event's stream id:
                                      {op, ad_id, ts, space, vec (upsert: float32 little-endian bytes, d of them)}

A base version's manifest records ``stream_position``: the last event its ads include (events up to it were folded
into the catalogue by the refresh), and ``stream_previous``: the version it replaced. A replica serving version V
applies the entries after V's position of V's log *and* of V's predecessor's log: the updater writes to the log of
whatever is ``current`` (checked in the same MULTI/EXEC), copies the predecessor's tail when it sees a new base,
and until then a replica that has swapped already reads that tail itself. Entry ids are event ids, so an entry in
both logs is one event; a replica applies an entry only when it is newer than the last one it applied for that ad.
The log lives under ``v:{ver}:``, so gc removes it with its version. Bytes and strings only, never pickle.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import redis

from hlm.events import stream_id

ZERO = "0-0"


def delta_key(index: str, version: str) -> str:
    return f"hlm:{index}:v:{version}:delta"


@dataclass(frozen=True)
class DeltaEntry:
    event_id: str
    op: str  # upsert | delete
    ad_id: str
    vector: np.ndarray | None  # (d,) float32, upsert only
    space: str | None  # the fingerprint of the vector's space, upsert only
    ts: int = 0  # the event's producer time (ms), for latency reports

    def fields(self) -> dict[str, bytes | str]:
        out: dict[str, bytes | str] = {"op": self.op, "ad_id": self.ad_id, "ts": str(self.ts)}
        if self.vector is not None:
            out["vec"] = np.ascontiguousarray(self.vector, dtype="<f4").tobytes()
            out["space"] = self.space or ""
        return out


def decode(entry_id: bytes | str, fields: dict[bytes, bytes]) -> DeltaEntry:
    vec = fields.get(b"vec")
    return DeltaEntry(
        entry_id.decode() if isinstance(entry_id, bytes) else entry_id,
        fields[b"op"].decode(), fields[b"ad_id"].decode(),
        np.frombuffer(vec, dtype="<f4").astype(np.float32) if vec is not None else None,
        fields[b"space"].decode() if b"space" in fields else None, int(fields.get(b"ts", b"0")))


def position(manifest: dict) -> str:
    """The last event a base version includes (``0-0``: none; a version published outside the refresh)."""
    return manifest.get("stream_position") or ZERO


def newer(a: str, b: str) -> bool:
    return stream_id(a) > stream_id(b)


class DeltaLog:
    """Reads and writes the delta logs of one index."""

    def __init__(self, client: redis.Redis, index: str) -> None:
        self.client, self.index = client, index

    def key(self, version: str) -> str:
        return delta_key(self.index, version)

    def read(self, version: str, after: str = ZERO, *, page: int = 10_000) -> list[DeltaEntry]:
        """Every entry of ``version``'s log after ``after``, oldest first."""
        out: list[DeltaEntry] = []
        start = f"({after}"
        while True:
            rows = self.client.xrange(self.key(version), min=start, max="+", count=page)
            out += [decode(i, f) for i, f in rows]
            if len(rows) < page:
                return out
            start = f"({rows[-1][0].decode()}"

    def last_id(self, version: str) -> str | None:
        rows = self.client.xrevrange(self.key(version), count=1)
        return rows[0][0].decode() if rows else None

    def append(self, pipe: redis.client.Pipeline, version: str, entries: Iterable[DeltaEntry], floor: str) -> int:
        """Queue XADDs of the entries newer than ``floor`` (the base's position or the log's last id), in id order,
        into ``pipe`` (the caller's MULTI). Returns how many were queued: older ones are already in this log or
        in the base, so a replay writes nothing twice."""
        n = 0
        for e in sorted(entries, key=lambda e: stream_id(e.event_id)):
            if newer(e.event_id, floor):
                pipe.xadd(self.key(version), e.fields(), id=e.event_id)
                floor, n = e.event_id, n + 1
        return n
