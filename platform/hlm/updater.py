"""The streaming updater: event stream → validate → embed upserts with the teacher → delta log of ``current`` → ack.

One updater works on an index at a time (it holds ``hlm:{index}:updater``, a `hlm.lease.Lease`); its throughput
comes from the encoder it is given (`pipelines.stream_ads` passes a Ray actor pool). It reads the event stream with
the consumer group ``hlm-updater`` in micro-batches, oldest first:

1. every pending entry first (XAUTOCLAIM from ``0-0``, no idle time: the lease says their consumer is dead, or is
   this one after a Redis error), then new entries (XREADGROUP ``>``), up to ``read_ahead`` micro-batches at a time;
2. deletes need no teacher: they are appended to the delta log of the version ``current`` names as soon as they are
   read (one Lua script that checks ``current`` and skips event ids the log holds already, or the base includes:
   a replayed event writes nothing) and acknowledged; malformed entries go to the dead-letter stream with their
   reason. Upserts wait in a queue: a delete never waits behind the embedding of upserts read before it, which is
   safe because replicas order entries per ad by event id;
3. one micro-batch of queued upserts is embedded in one call of ``encode(texts) -> float32 (n, d)`` on a background
   thread while the loop goes on reading (so a delete never waits for the teacher either), then appended the same
   way and acknowledged;
4. XACK, only after the append: a crash before it leaves the events pending for the next updater.

When ``current`` moves to a new base, the tail of the old base's log after the new base's stream position is copied
into the new base's log (the vectors are reused), so nothing the refresh did not fold in is lost.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field

import numpy as np
import redis
from pydantic import Field

from hlm.config import Config, Section
from hlm.deltas import DeltaEntry, DeltaLog, NotCurrent, newer, position
from hlm.events import GROUP, MAX_TEXT_CHARS, AdEvent, dead_letter_key, events_key, parse
from hlm.lease import Lease, LeaseHeld
from hlm.store import IndexStore, StoreError, StoreUnavailable

logger = logging.getLogger(__name__)
Encode = Callable[[list[str]], np.ndarray]  # texts -> float32 (n, d), the teacher's `Encoder.encode` contract


def lease_key(index: str) -> str:
    """The key of the lease that lets one updater at a time work on ``index``."""
    return f"hlm:{index}:updater"


class StreamJob(Section):
    """`pipelines.stream_ads`: the long-running updater of one index."""

    index: str = Field("ads", description="index name in Redis: keys hlm:{index}:*")
    redis_url: str | None = Field(None, description="None = $HLM_REDIS_URL, else redis://127.0.0.1:6379/0")
    batch_size: int = Field(64, gt=0, description="upserts per micro-batch (the most one teacher call embeds); "
                            "smaller batches make deletes visible sooner while the teacher is busy")
    read_ahead: int = Field(64, gt=0, description="micro-batches read ahead: their deletes are applied before "
                            "the upserts queued ahead of them are embedded (the queue holds at most batch_size × "
                            "read_ahead texts)")
    block_ms: int = Field(50, gt=0, description="how long one read waits for new events")
    max_text_chars: int = Field(MAX_TEXT_CHARS, gt=0, description="longer upsert texts go to the dead-letter stream")
    lease_s: float = Field(10.0, gt=0, description="TTL of the updater's lease: how long a killed updater blocks "
                           "the next one")
    consumer: str = Field("", description="consumer name in the group ('' = host-pid)")


class StreamConfig(Config):
    stream: StreamJob = StreamJob()


@dataclass
class Counts:
    events: int = 0
    upserts: int = 0
    deletes: int = 0
    dead: int = 0
    written: int = 0  # delta entries appended (a replayed event adds none)
    batches: int = 0
    embed_s: float = 0.0
    errors: list[str] = field(default_factory=list)


class StreamUpdater:
    def __init__(self, client: redis.Redis, index: str, encode: Encode, space: str, *, consumer: str = "",
                 batch_size: int = 64, read_ahead: int = 64, block_ms: int = 50,
                 max_text_chars: int = MAX_TEXT_CHARS) -> None:
        self.client, self.index, self.encode, self.space = client, index, encode, space
        self.consumer = consumer or f"{socket.gethostname()}-{os.getpid()}"
        self.batch_size, self.block_ms, self.max_text_chars = batch_size, block_ms, max_text_chars
        self.read_count = batch_size * read_ahead
        self.queued: dict[str, AdEvent] = {}  # upserts read (pending in the group), not yet embedded; in stream order
        self.store, self.log = IndexStore(client, index), DeltaLog(client, index)
        self.key, self.dead_key = events_key(index), dead_letter_key(index)
        self.base: str | None = None  # the version whose log this updater writes
        self._claim_from: str | None = "0-0"  # XAUTOCLAIM cursor; None once the pending entries are done
        self.counts = Counts()

    # ------------------------------------------------------------------------------------------ read
    def ensure_group(self) -> None:
        """The consumer group, created at the stream's start (events a base includes are skipped when written)."""
        try:
            self.client.xgroup_create(self.key, GROUP, id="0", mkstream=True)
        except redis.ResponseError as e:
            if "BUSYGROUP" not in str(e):
                raise

    def read(self, *, block: bool = True) -> list[tuple[bytes, dict]]:
        """The next entries for this consumer: pending ones first, then new ones (waiting ``block_ms`` if ``block``)."""
        if self._claim_from is not None:
            cursor, claimed, *_ = self.client.xautoclaim(self.key, GROUP, self.consumer, min_idle_time=0,
                                                         start_id=self._claim_from, count=self.read_count)
            cursor = cursor.decode() if isinstance(cursor, bytes) else cursor
            self._claim_from = None if cursor == "0-0" else cursor
            if claimed:
                return claimed
        reply = self.client.xreadgroup(GROUP, self.consumer, {self.key: ">"}, count=self.read_count,
                                       block=self.block_ms if block else None)
        return reply[0][1] if reply else []

    # ------------------------------------------------------------------------------------------ one batch
    def process(self, entries: list[tuple[bytes, dict]]) -> int:
        """Take ``entries`` (deletes and dead letters written and acked now), then embed every queued upsert;
        returns the delta entries written."""
        written = self.take(entries)
        while self.queued:
            written += self.embed_next()
        return written

    def take(self, entries: list[tuple[bytes, dict]]) -> int:
        """Validate ``entries``: write and ack their deletes and dead letters (no teacher), queue their upserts.
        Returns the delta entries written."""
        deletes: list[DeltaEntry] = []
        dead: list[tuple[str, dict]] = []
        for raw_id, fields in entries:
            parsed = parse(raw_id.decode(), fields, max_text_chars=self.max_text_chars)
            if isinstance(parsed, str):
                dead.append((raw_id.decode(), {**fields, b"event_id": raw_id, b"reason": parsed.encode()}))
                logger.warning("event %s to the dead-letter stream: %s", raw_id.decode(), parsed)
            elif parsed.op == "delete":
                deletes.append(DeltaEntry(parsed.id, parsed.op, parsed.ad_id, None, None, parsed.ts))
            else:
                self.queued[parsed.id] = parsed  # a pending entry claimed again replaces itself
        written = self._write(deletes)
        self._dead_letter(dead)
        done = [d.event_id for d in deletes] + [event_id for event_id, _ in dead]
        if done:
            self.client.xack(self.key, GROUP, *done)  # only now: the writes are in Redis
        c = self.counts
        c.events, c.deletes, c.dead = c.events + len(entries), c.deletes + len(deletes), c.dead + len(dead)
        c.written += written
        return written

    def embed_next(self) -> int:
        """Embed, write and ack the oldest micro-batch of queued upserts; returns the delta entries written."""
        batch, dead = self._next_batch(), []
        return self._apply(batch, dead, *self._embed_upserts(batch, dead))

    def _next_batch(self) -> list[AdEvent]:
        return list(self.queued.values())[:self.batch_size]

    def _apply(self, batch: list[AdEvent], dead: list[tuple[str, dict]], upserts: list[AdEvent],
               vectors: np.ndarray) -> int:
        """Write the embedded ``upserts`` of ``batch`` and its ``dead`` letters, then ack and dequeue the batch."""
        written = self._write([DeltaEntry(e.id, e.op, e.ad_id, v, self.space, e.ts)
                               for e, v in zip(upserts, vectors, strict=True)]) if upserts else 0
        self._dead_letter(dead)
        self.client.xack(self.key, GROUP, *[e.id for e in batch])  # only now: the writes are in Redis
        for e in batch:
            self.queued.pop(e.id, None)
        c = self.counts
        c.upserts, c.dead, c.written, c.batches = c.upserts + len(upserts), c.dead + len(dead), c.written + written, \
            c.batches + 1
        return written

    def _embed_upserts(self, upserts: list[AdEvent], dead: list[tuple[str, dict]]) -> tuple[list[AdEvent], np.ndarray]:
        """The upserts the teacher embeds and their vectors (n, d). If the batch fails, each text is embedded alone
        and one the teacher fails on goes to ``dead`` with the error, so one poison text cannot block the stream;
        if every text fails alone too, the failure is the teacher's, not the events': it is raised and the events
        stay pending."""
        if not upserts:
            return [], np.zeros((0, 0), np.float32)
        try:
            return upserts, self._embed([e.text for e in upserts])
        except Exception as batch_error:  # noqa: BLE001 — any teacher failure; redis errors cannot come from here
            kept, vectors, failed = [], [], []
            for e in upserts:
                try:
                    vectors.append(self._embed([e.text])[0])
                    kept.append(e)
                except Exception as e_error:  # noqa: BLE001
                    failed.append((e, f"the teacher failed on this text: {type(e_error).__name__}: {e_error}"))
            if not kept:
                raise batch_error
            for e, reason in failed:
                logger.warning("event %s to the dead-letter stream: %s", e.id, reason)
                dead.append((e.id, {b"op": b"upsert", b"ad_id": e.ad_id.encode(), b"text": e.text.encode(),
                                    b"ts": str(e.ts).encode(), b"event_id": e.id.encode(), b"reason": reason.encode()}))
            return kept, np.stack(vectors)

    def _embed(self, texts: list[str]) -> np.ndarray:
        started = time.perf_counter()
        emb = np.asarray(self.encode(texts), dtype=np.float32)  # (n, d)
        if emb.ndim != 2 or emb.shape[0] != len(texts):
            raise ValueError(f"the encoder returned shape {emb.shape} for {len(texts)} texts")
        self.counts.embed_s += time.perf_counter() - started
        return emb

    def _write(self, deltas: list[DeltaEntry]) -> int:
        """Append to the log of ``current``; the append commits only if ``current`` did not move meanwhile (else the
        entries go to the new base)."""
        while deltas:
            base = self.store.current()
            if base is None:
                raise StoreError(f"index {self.index}: nothing published yet; the events stay pending")
            if base != self.base:
                self._adopt(base)
            try:
                return self.log.append(base, self.store.current_key, deltas, position(self.store.manifest(base)))
            except NotCurrent:
                continue
        return 0

    def _dead_letter(self, dead: list[tuple[str, dict]]) -> None:
        """Dead letters keep their event id as entry id, so a replayed one is not written twice. A text the teacher
        failed on is dead-lettered after later events were: below the stream's last id it gets a new entry id
        (its ``event_id`` field names the event), once unless the updater died between that write and its ack."""
        floor = self._last_id(self.dead_key)
        pipe = self.client.pipeline(transaction=True)
        for event_id, fields in sorted(dead, key=lambda d: tuple(map(int, d[0].split("-")))):  # XADD needs ids rising
            if newer(event_id, floor):
                pipe.xadd(self.dead_key, fields, id=event_id)
            elif not self.client.xrange(self.dead_key, event_id, event_id):
                pipe.xadd(self.dead_key, fields)
        pipe.execute()

    def _adopt(self, base: str) -> None:
        """Start writing to ``base``: check its space, then copy the tail of the log written so far (this updater's
        previous base, else the one ``base`` replaced) after ``base``'s stream position into ``base``'s log."""
        manifest = self.store.manifest(base)
        if manifest["space"] != self.space:
            raise StoreError(f"index {self.index} version {base} is in space {manifest['space']}, the updater's "
                             f"teacher in {self.space}: no deltas are written for it; the events stay pending")
        previous = self.base or manifest.get("stream_previous")
        if previous and previous != base:
            tail = self.log.read(previous, after=position(manifest))
            try:
                copied = self.log.append(base, self.store.current_key, tail, position(manifest))
            except NotCurrent:
                return  # current moved again: the caller adopts the newer one
            logger.info("new base %s: copied %d delta entries after %s from %s", base, copied, position(manifest),
                        previous)
        self.base = base

    def _last_id(self, key: str) -> str:
        rows = self.client.xrevrange(key, count=1)
        return rows[0][0].decode() if rows else "0-0"

    # ------------------------------------------------------------------------------------------ loop
    def run(self, stop: threading.Event, *, lease_s: float = 10.0, retry_s: float = 1.0) -> Counts:
        """Take the lease (waiting while a live or killed updater holds it), then process batches until ``stop``.
        Redis trouble, or no base to write to, waits and retries; the events stay pending meanwhile."""
        lease = Lease(self.client, lease_key(self.index), owner=self.consumer, ttl_s=lease_s)
        while not stop.is_set():
            try:
                lease.acquire()
                break
            except (LeaseHeld, StoreUnavailable) as e:
                logger.warning("waiting for the updater lease: %s", e)
                stop.wait(retry_s)
        pool = ThreadPoolExecutor(1, thread_name_prefix="hlm-embed")
        embedding: tuple[list[AdEvent], list[tuple[str, dict]], Future] | None = None  # the batch the teacher has
        try:
            while not stop.is_set():
                try:
                    if not lease.held():
                        raise RuntimeError(f"lost the lease {lease_key(self.index)} (a pause over {lease_s} s); "
                                           "another updater may be running, so this one stops")
                    self.ensure_group()
                    if len(self.queued) < self.read_count:
                        if entries := self.read():  # waits block_ms at most: the teacher works meanwhile
                            self.take(entries)
                    elif embedding is not None:
                        wait([embedding[2]], timeout=self.block_ms / 1000)
                    if embedding is not None and embedding[2].done():
                        (batch, dead, future), embedding = embedding, None
                        self._apply(batch, dead, *future.result())
                    if embedding is None and self.queued:
                        batch, dead = self._next_batch(), []
                        embedding = batch, dead, pool.submit(self._embed_upserts, batch, dead)
                except (redis.RedisError, StoreError) as e:
                    self.counts.errors = (self.counts.errors + [f"{type(e).__name__}: {e}"])[-10:]
                    logger.warning("updater %s: %s; retrying in %.1f s", self.consumer, e, retry_s)
                    self._claim_from = "0-0"  # what was read and not acked is still pending: take it again, in order
                    self.queued.clear()
                    embedding = None  # its result is dropped: its events are pending and will be read again
                    self.base = None if isinstance(e, StoreError) else self.base
                    stop.wait(retry_s)
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
            try:
                lease.release()
            except redis.RedisError as e:
                logger.warning("could not release the updater lease (it expires by itself): %s", e)
        return self.counts
