"""The serving copy of an index: searched by requests, refreshed from Redis in the background.

`current` in Redis is the source of truth: a refresh thread polls it, and a pub/sub subscription on
the events channel only wakes the thread early. A new version is loaded, verified (sha256 inside
`IndexStore.load`) and space-checked off the request path, then swapped in by replacing one reference,
so a request sees either the old or the new index, never a mix. While loading, when Redis is
unreachable, or when a version is refused (another space, bytes that fail their sha256, a missing chunk
or manifest, bytes FAISS cannot read: any failure but Redis being unavailable), the replica keeps serving what
it has and does not fetch the refused version again. A version that would not fit in memory beside the served
one is not fetched (the replica says so in its status and retries on the next poll); a replica whose first
load fails serves 503s with a reason and stays up, instead of crash-looping.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import redis

from hlm.delta_follower import DeltaFollower
from hlm.index import AdIndex
from hlm.memory import available_memory_bytes
from hlm.space import SpaceMismatch
from hlm.store import IndexStore, StoreError, StoreUnavailable

logger = logging.getLogger(__name__)
SPACE_HINT = (" (the student is not aligned to the teacher that embedded this index's ads: serve the student the "
              "recipe aligned to that teacher, not student-default)")


@dataclass(frozen=True)
class Snapshot:
    """One immutable (index, version) pair; requests hold it for their whole search."""

    index: AdIndex
    version: str
    loaded_at: float = field(default_factory=time.time)
    deltas: DeltaFollower | None = None  # the streamed upserts and deletes over this version (hlm.delta_follower)


@dataclass
class RefreshState:
    last_check: float | None = None
    last_error: str | None = None
    refused: dict[str, str] = field(default_factory=dict)  # version -> why; not retried until current moves


class LiveIndex:
    def __init__(self, store: IndexStore, expected_space: str, *, poll_s: float = 2.0,
                 available_memory: Callable[[], int] = available_memory_bytes):
        self.store, self.expected_space, self.poll_s = store, expected_space, poll_s
        self.available_memory = available_memory
        self.snapshot: Snapshot | None = None
        self.state = RefreshState()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    # ------------------------------------------------------------------------------------------ requests
    def search(self, q_emb: np.ndarray, k: int | Sequence[int]) -> tuple[list[list[tuple[str, float]]], str]:
        """(per row of ``q_emb (B, d)``, its top ``k`` (one k, or one per row) as (ad_id, score) best first; the
        version they all came from). The whole batch reads one snapshot, so a swap never splits it.

        One FAISS search per distinct k, not one at the largest k cut per row: an approximate index (HNSW's
        efSearch = max(efSearch, k)) may rank a prefix differently at a larger k, and a batched request must
        get what it would get alone."""
        snap = self.snapshot
        if snap is None:
            raise StoreError(self._not_ready())
        ks = [k] * len(q_emb) if isinstance(k, int | np.integer) else list(k)
        if len(ks) != len(q_emb):
            raise ValueError(f"{len(ks)} values of k for {len(q_emb)} queries")
        hits: list[list[tuple[str, float]]] = [[] for _ in ks]
        for k_value in dict.fromkeys(ks):
            rows = [i for i, k_row in enumerate(ks) if k_row == k_value]
            found = (snap.deltas.index.search(q_emb[rows], k_value) if snap.deltas else  # (b, d) -> b lists
                     snap.index.search_ids(q_emb[rows], min(k_value, snap.index.ntotal)))
            for i, row_hits in zip(rows, found, strict=True):
                hits[i] = row_hits
        return hits, snap.version

    def status(self) -> dict:
        snap = self.snapshot
        return {
            "index": self.store.name,
            "version": snap.version if snap else None,
            "space": snap.index.space if snap else self.expected_space,
            "count": snap.index.ntotal if snap else 0,
            "factory": snap.index.factory if snap else None,
            "age_s": round(time.time() - snap.loaded_at, 1) if snap else None,
            "last_check_age_s": round(time.time() - self.state.last_check, 1) if self.state.last_check else None,
            "last_error": self.state.last_error,
            "refused": dict(self.state.refused),
            **(snap.deltas.status() if snap and snap.deltas else {}),
        }

    # ------------------------------------------------------------------------------------------ refresh
    def refresh(self) -> bool:
        """Load `current` if it moved; True when a new version was swapped in. Never raises on Redis trouble."""
        self.state.last_check = time.time()
        try:
            version = self.store.current()
            if version is None or version in self.state.refused:
                return False
            if self.snapshot is not None and version == self.snapshot.version:
                return False
            if short := self._short_of_memory(version):
                self.state.last_error = short
                logger.error("%s; still serving %s", short, self._serving())
                return False
            index = self.store.load(version, expected_space=self.expected_space)
            deltas = DeltaFollower.start(self.store, version, index)  # replays the version's delta log before the swap
        except (StoreUnavailable, redis.RedisError) as e:  # Redis trouble: transient, retried on the next poll
            self.state.last_error = str(e)
            logger.warning("index refresh failed, still serving %s: %s", self._serving(), e)
            return False
        # Redis answered and this version did not load (other space, bad bytes, no manifest, FAISS could not read
        # it, anything else): retrying the same bytes gives the same answer, so don't fetch it again.
        except Exception as e:
            why = f"{type(e).__name__}: {e}" + (SPACE_HINT if isinstance(e, SpaceMismatch) else "")
            self.state.refused[version] = why
            self.state.last_error = why
            logger.error("refused version %s, still serving %s: %s", version, self._serving(), why)
            return False
        self.snapshot = Snapshot(index, version, deltas=deltas)
        self.state.last_error = None
        logger.info("serving %s version %s (%d ads)", self.store.name, version, index.ntotal)
        return True

    def _short_of_memory(self, version: str) -> str | None:
        """Why ``version`` cannot be loaded beside the one served now, or None. A load holds the fetched bytes and
        FAISS's copy of them while the served index is still referenced (~2x its size more); over the pod's limit
        the replica would be OOM-killed and restart into the same load. Not a refusal: memory may free up."""
        need = 2 * self.store.manifest(version)["size"]
        free = self.available_memory()
        if need <= free:
            return None
        return (f"not enough memory to load {self.store.name} version {version}: it needs about {need / 2**20:.0f} "
                f"MiB, {free / 2**20:.0f} MiB are available")

    def refusal(self) -> str | None:
        """The latest refused version and why (short, no traceback): what a 503 from /v1/search may tell a client."""
        if not self.state.refused:
            return None
        version, reason = next(reversed(self.state.refused.items()))
        return f"refused version {version}: {reason}"

    def _not_ready(self) -> str:
        """Why there is nothing to search, for the replica's log."""
        why = f"index {self.store.name}: no version loaded yet"
        if refusal := self.refusal():
            return f"{why}; {refusal}"
        return f"{why} ({self.state.last_error})" if self.state.last_error else why

    def _serving(self) -> str | None:
        return self.snapshot.version if self.snapshot else None

    def start(self) -> None:
        """Background poll loop plus a pub/sub listener that wakes it early."""
        for target in (self._poll_loop, self._listen_loop, self._delta_loop):
            t = threading.Thread(target=target, name=f"hlm-{target.__name__}", daemon=True)
            t.start()
            self._threads.append(t)

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()

    def _poll_loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.refresh()
            except Exception as e:  # a bug or a malformed version must not end the loop: a dead loop never swaps
                self.state.last_error = f"{type(e).__name__}: {e}"
                logger.exception("index refresh crashed, still serving %s", self._serving())
            self._wake.wait(self.poll_s * (0.75 + 0.5 * np.random.random()))  # jitter: replicas don't stampede
            self._wake.clear()

    def _listen_loop(self) -> None:
        while not self._stop.is_set():
            try:
                pubsub = self.store.client.pubsub(ignore_subscribe_messages=True)
                pubsub.subscribe(self.store.channel)
                while not self._stop.is_set():
                    if pubsub.get_message(timeout=1.0) is not None:
                        # Every replica hears the hint at once: a random delay up to one poll staggers their loads,
                        # so they neither hit their memory peak together nor fetch from Redis together.
                        self._stop.wait(self.poll_s * np.random.random())
                        self._wake.set()
            except redis.RedisError:
                self._stop.wait(self.poll_s)  # the poll loop is the source of truth; retry the hint later

    def _delta_loop(self) -> None:
        """Follows the served version's delta log (blocking reads); Redis trouble keeps what was applied."""
        while not self._stop.is_set():
            snap = self.snapshot
            if snap is None or snap.deltas is None:
                self._stop.wait(0.1)
                continue
            try:
                snap.deltas.follow(block_ms=200)
            except redis.RedisError as e:
                snap.deltas.last_error = f"{type(e).__name__}: {e}"
                self._stop.wait(self.poll_s)
