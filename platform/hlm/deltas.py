"""Per-base-version delta logs in Redis: what changed since a base index was built, ready to search.

Key layout (docs/design.md, "Streaming ad updates")::

    hlm:{index}:v:{ver}:delta          -> Redis Stream, one entry per applied event:
                                          {event (its stream id), op, ad_id, ts, space, vec (upsert: float32
                                          little-endian bytes, d of them)}
    hlm:{index}:v:{ver}:delta:applied  -> hash: the event ids in that log (a replayed event is not appended again)

A base version's manifest records ``stream_position``: the last event its ads include (events up to it were folded
into the catalogue by the refresh), and ``stream_previous``: the version it replaced. A replica serving version V
applies the entries of events after V's position from V's log *and* from V's predecessor's log: the updater writes
to the log of whatever is ``current`` (checked inside the same script), copies the predecessor's tail when it sees
a new base, and until then a replica that has swapped already reads that tail itself. Deletes are appended before
the upserts of the same micro-batch (they need no teacher), so a log is not in event order: a replica applies an
entry only when its event is newer than the last one it applied for that ad. The log lives under ``v:{ver}:``, so
gc removes it with its version. Bytes and strings only, never pickle.
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
        out: dict[str, bytes | str] = {"event": self.event_id, "op": self.op, "ad_id": self.ad_id, "ts": str(self.ts)}
        if self.vector is not None:
            out["vec"] = np.ascontiguousarray(self.vector, dtype="<f4").tobytes()
            out["space"] = self.space or ""
        return out


def decode(fields: dict[bytes, bytes]) -> DeltaEntry:
    vec = fields.get(b"vec")
    return DeltaEntry(
        fields[b"event"].decode(), fields[b"op"].decode(), fields[b"ad_id"].decode(),
        np.frombuffer(vec, dtype="<f4").astype(np.float32) if vec is not None else None,
        fields[b"space"].decode() if b"space" in fields else None, int(fields.get(b"ts", b"0")))


def position(manifest: dict) -> str:
    """The last event a base version includes (``0-0``: none; a version published outside the refresh)."""
    return manifest.get("stream_position") or ZERO


def newer(a: str, b: str) -> bool:
    return stream_id(a) > stream_id(b)


# Append the entries whose event id is not in the log's `applied` hash, only while `current` is the expected version:
# one atomic step, so a replay appends nothing twice and no entry lands in a version that stopped being current.
# KEYS: log, applied, current; ARGV: version, then per entry: event id, field count, field, value, …
_APPEND = """
if redis.call('get', KEYS[3]) ~= ARGV[1] then return -1 end
local i, n = 2, 0
while i <= #ARGV do
  local k = tonumber(ARGV[i + 1])
  if redis.call('hsetnx', KEYS[2], ARGV[i], 1) == 1 then
    local args = {KEYS[1], '*'}
    for j = 0, 2 * k - 1 do args[#args + 1] = ARGV[i + 2 + j] end
    redis.call('xadd', unpack(args))
    n = n + 1
  end
  i = i + 2 + 2 * k
end
return n
"""


class NotCurrent(Exception):
    """The version stopped being current before the append: nothing was written."""


class DeltaLog:
    """Reads and writes the delta logs of one index."""

    def __init__(self, client: redis.Redis, index: str) -> None:
        self.client, self.index = client, index

    def key(self, version: str) -> str:
        return delta_key(self.index, version)

    def read(self, version: str, after: str = ZERO, *, page: int = 10_000) -> list[DeltaEntry]:
        """Every entry of ``version``'s log whose event is after ``after``, in log order."""
        out: list[DeltaEntry] = []
        start = "-"
        while True:
            rows = self.client.xrange(self.key(version), min=start, max="+", count=page)
            out += [e for e in (decode(f) for _, f in rows) if newer(e.event_id, after)]
            if len(rows) < page:
                return out
            start = f"({rows[-1][0].decode()}"

    def append(self, version: str, current_key: str, entries: Iterable[DeltaEntry], after: str) -> int:
        """Append the entries whose event is after ``after`` (the base's position) and not yet in the log, if
        ``current_key`` still names ``version`` (else :class:`NotCurrent`). Returns how many were appended."""
        args: list = [version]
        for e in entries:
            if newer(e.event_id, after):
                fields = e.fields()
                args += [e.event_id, len(fields)] + [x for kv in fields.items() for x in kv]
        if len(args) == 1:
            return 0
        n = self.client.eval(_APPEND, 3, self.key(version), f"{self.key(version)}:applied", current_key, *args)
        if n < 0:
            raise NotCurrent(version)
        return n
