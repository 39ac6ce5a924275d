"""The nightly refresh's share of streaming: fold the event stream into the catalogue, up to a recorded position.

The refresh reads the stream's last id (its *position*) when it starts, applies every retained event up to it over
the catalogue (the last event of an ad wins: an upsert sets its text, a delete drops it; a malformed event is
skipped, as the updater dead-letters it), and records the position in the new version's manifest
(``stream_position``, with ``stream_previous``: the version it replaces). Replicas and the updater then apply only
the events after it to the new base (`hlm.deltas`), so no event is lost or applied twice across the swap. This
assumes that every change of an ad goes through the stream (or is in the export as well): an event is newer than
the export's row for its ad.
"""

from __future__ import annotations

import pyarrow as pa
import pyarrow.compute as pc
import redis

from hlm.deltas import ZERO
from hlm.events import AdEvent, events_key, parse


def stream_position(client: redis.Redis, index: str) -> str:
    rows = client.xrevrange(events_key(index), count=1)
    return rows[0][0].decode() if rows else ZERO


def last_events(client: redis.Redis, index: str, upto: str, *, page: int = 10_000) -> dict[str, AdEvent]:
    """ad_id -> its last valid event at or before ``upto``."""
    last: dict[str, AdEvent] = {}
    start = "-"
    while upto != ZERO:
        rows = client.xrange(events_key(index), min=start, max=upto, count=page)
        for raw_id, fields in rows:
            if isinstance(event := parse(raw_id.decode(), fields), AdEvent):
                last[event.ad_id] = event
        if len(rows) < page:
            break
        start = f"({rows[-1][0].decode()}"
    return last


def fold(rows: pa.Table, rejected: pa.Table, events: dict[str, AdEvent]) -> tuple[pa.Table, pa.Table]:
    """(catalogue rows ad_id, text; rejected rows) with ``events`` applied: an ad with an event takes it."""
    if not events:
        return rows, rejected
    touched = pa.array(list(events), pa.string())
    keep = rows.filter(pc.invert(pc.is_in(rows.column("ad_id"), touched)))
    upserts = [e for e in events.values() if e.op == "upsert"]
    added = pa.table({"ad_id": pa.array([e.ad_id for e in upserts], pa.string()),
                      "text": pa.array([e.text for e in upserts], pa.string())})
    return (pa.concat_tables([keep, added.cast(keep.schema)]),
            rejected.filter(pc.invert(pc.is_in(rejected.column("ad_id"), touched))))
