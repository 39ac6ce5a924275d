"""The ad event stream: upserts and deletes of single ads, between two nightly refreshes.

Key layout (docs/design.md, "Streaming ad updates")::

    hlm:{index}:ad_events          -> Redis Stream; XADD {op: upsert|delete, ad_id, text (upsert only), ts (ms)}
    hlm:{index}:ad_events:dead     -> Redis Stream: malformed events with their fields, `event_id` and `reason`

The stream entry id (``<ms>-<seq>``, assigned by Redis, increasing) is an event's identity: the updater writes it
into the delta log as the delta entry's own id, so a replayed event is recognised and changes nothing
(`hlm.deltas`). :func:`parse` is the one validation rule: the producer applies it before XADD, the updater to
every entry it reads (another producer may skip it), and the refresh when it folds the stream into a catalogue.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import redis

logger = logging.getLogger(__name__)

OPS = ("upsert", "delete")
MAX_TEXT_CHARS = 8192  # longer texts are truncated by any tokenizer anyway; a huge one is a producer bug
MAX_ID_CHARS = 256
GROUP = "hlm-updater"  # the updater's consumer group on the event stream


def events_key(index: str) -> str:
    return f"hlm:{index}:ad_events"


def dead_letter_key(index: str) -> str:
    return f"hlm:{index}:ad_events:dead"


def stream_id(value: str | bytes) -> tuple[int, int]:
    """``"1700000000000-3"`` -> (1700000000000, 3): stream ids compare as this pair, never as strings."""
    text = value.decode() if isinstance(value, bytes) else value
    ms, _, seq = text.partition("-")
    return int(ms), int(seq or 0)


class EventError(ValueError):
    """An event that the producer refuses to send; the message names the field."""


@dataclass(frozen=True)
class AdEvent:
    id: str  # stream entry id ("" before XADD)
    op: str  # upsert | delete
    ad_id: str
    text: str | None  # upsert only
    ts: int  # producer's clock, ms since the epoch (latency reports only; order is the stream id's)


def _text(fields: Mapping, name: str) -> str | None:
    value = fields.get(name, fields.get(name.encode()))
    if value is None:
        return None
    return value.decode("utf-8", errors="replace") if isinstance(value, bytes) else str(value)


def parse(entry_id: str, fields: Mapping, *, max_text_chars: int = MAX_TEXT_CHARS) -> AdEvent | str:
    """The event of a stream entry, or why it is malformed (the dead-letter reason)."""
    op, ad_id, text, ts = (_text(fields, k) for k in ("op", "ad_id", "text", "ts"))
    if op not in OPS:
        return f"unknown op {op!r} (expected one of {', '.join(OPS)})" if op else "missing field op"
    if not ad_id or not ad_id.strip():
        return "missing field ad_id"
    if len(ad_id) > MAX_ID_CHARS:
        return f"ad_id of {len(ad_id)} chars, over the limit of {MAX_ID_CHARS}"
    if op == "upsert":
        if text is None or not text.strip():
            return "empty text (an upsert needs the ad's text)"
        if len(text) > max_text_chars:
            return f"text of {len(text)} chars, over the limit of {max_text_chars}"
    try:
        stamp = int(ts) if ts is not None else 0
    except ValueError:
        return f"ts {ts!r} is not an integer (ms since the epoch)"
    return AdEvent(entry_id, op, ad_id, text if op == "upsert" else None, stamp)


def fields_of(op: str, ad_id: str, text: str | None = None, ts: int | None = None) -> dict[str, str]:
    fields = {"op": op, "ad_id": ad_id, "ts": str(ts if ts is not None else int(time.time() * 1000))}
    if text is not None:
        fields["text"] = text
    return fields


class AdEventProducer:
    """Feeds the event stream of one index; every event is validated by :func:`parse` before XADD.

    >>> producer = AdEventProducer(redis_client(), "ads")          # doctest: +SKIP
    >>> producer.upsert("ad-1", "cordless drill 18V")               # doctest: +SKIP
    >>> producer.delete("ad-2")                                     # doctest: +SKIP
    """

    def __init__(self, client: redis.Redis, index: str, *, max_text_chars: int = MAX_TEXT_CHARS) -> None:
        self.client, self.index, self.key = client, index, events_key(index)
        self.max_text_chars = max_text_chars

    def upsert(self, ad_id: str, text: str) -> str:
        return self.send([fields_of("upsert", ad_id, text)])[0]

    def delete(self, ad_id: str) -> str:
        return self.send([fields_of("delete", ad_id)])[0]

    def check(self, fields: Mapping, where: str = "event") -> dict[str, str]:
        """``fields`` as strings, or :class:`EventError` naming ``where`` and the reason."""
        event = parse("", fields, max_text_chars=self.max_text_chars)
        if isinstance(event, str):
            raise EventError(f"{where}: {event}")
        return fields_of(event.op, event.ad_id, event.text, event.ts or None)

    def send(self, events: Iterable[Mapping]) -> list[str]:
        """XADD every event in one pipeline, in order; all are checked first, so a bad one sends none."""
        checked = [self.check(e, f"event {i}") for i, e in enumerate(events)]
        pipe = self.client.pipeline(transaction=False)
        for fields in checked:
            pipe.xadd(self.key, fields)
        ids = [i.decode() for i in pipe.execute()]
        logger.debug("sent %d events to %s", len(ids), self.key)
        return ids
