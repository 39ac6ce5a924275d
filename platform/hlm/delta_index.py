"""A base index plus the deltas applied to it: upserts in a small exact index beside it, tombstones over it.

Every ad a delta touched is a tombstone for the base (a delete hides it; an upsert replaces the base's stale
vector); an upserted ad's vector lives in a flat in-memory matrix searched exactly beside the base. Base results are
filtered by the tombstones, searching deeper until ``k`` survive (or the base is exhausted), and both result lists
merge by score. An entry is applied only when its event is newer than the base's stream position and than the last
event applied for that ad, so replaying a log, or reading one event from two logs, changes nothing. An upsert whose
space or width differs from the base's is refused (counted, with the reason), as a version of another space is.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterable

import numpy as np

from hlm.deltas import DeltaEntry, newer
from hlm.events import stream_id
from hlm.index import AdIndex

logger = logging.getLogger(__name__)
Hits = list[tuple[str, float]]


class DeltaIndex:
    def __init__(self, base: AdIndex, base_position: str) -> None:
        self.base, self.base_position = base, base_position
        self._lock = threading.Lock()  # apply() runs on the follower thread, search() on request threads
        self._last: dict[str, str] = {}  # ad_id -> id of the last event applied to it: the tombstones
        self._slot: dict[str, int] = {}  # ad_id -> row of _vectors, for ads whose last event is an upsert
        self._vectors = np.zeros((16, base.dim), np.float32)  # (capacity, d)
        self._owner: list[str | None] = [None] * 16  # row -> ad_id (None: free)
        self._live = np.zeros(16, bool)  # row holds an upsert
        self._free = list(range(15, -1, -1))
        self.applied = self.refused = 0
        self.last_refusal: str | None = None
        self.last_event: str | None = None
        self.last_event_ts = 0  # producer ms of the last applied event
        self.last_applied_at: float | None = None

    # ------------------------------------------------------------------------------------------ apply
    def apply(self, entries: Iterable[DeltaEntry]) -> int:
        """Apply entries (any order, duplicates allowed); returns how many changed something."""
        changed = 0
        with self._lock:
            for e in sorted(entries, key=lambda e: stream_id(e.event_id)):
                if not newer(e.event_id, self.base_position) or not newer(e.event_id, self._last.get(e.ad_id, "0-0")):
                    continue  # folded into the base, or applied already
                if e.op == "upsert" and (why := self._refusal(e)):
                    self.refused += 1
                    self.last_refusal = f"event {e.event_id} (ad {e.ad_id}): {why}"
                    logger.error("refused delta %s", self.last_refusal)
                    continue
                self._last[e.ad_id] = e.event_id
                if (row := self._slot.pop(e.ad_id, None)) is not None:
                    self._owner[row], self._live[row] = None, False
                    self._free.append(row)
                if e.op == "upsert":
                    self._put(e.ad_id, e.vector)
                changed += 1
                self.last_event, self.last_event_ts = e.event_id, e.ts
            self.applied += changed
            if changed:
                self.last_applied_at = time.time()
        return changed

    def _refusal(self, e: DeltaEntry) -> str | None:
        if e.space != self.base.space:
            return f"its vector is in space {e.space}, the base index in {self.base.space}"
        if e.vector is None or e.vector.shape != (self.base.dim,):
            return f"its vector has shape {None if e.vector is None else e.vector.shape}, the base d={self.base.dim}"
        return None

    def _put(self, ad_id: str, vector: np.ndarray) -> None:
        if not self._free:
            cap = len(self._owner)
            self._vectors = np.concatenate([self._vectors, np.zeros_like(self._vectors)])  # (2·cap, d)
            self._owner += [None] * cap
            self._live = np.concatenate([self._live, np.zeros(cap, bool)])
            self._free = list(range(2 * cap - 1, cap - 1, -1))
        row = self._free.pop()
        self._vectors[row], self._owner[row], self._live[row], self._slot[ad_id] = vector, ad_id, True, row

    # ------------------------------------------------------------------------------------------ search
    def search(self, q_emb: np.ndarray, k: int) -> list[Hits]:
        """Per row of ``q_emb (B, d)``, the top ``k`` (ad_id, score) of base-minus-tombstones plus the upserts."""
        base_hits = self._search_base(q_emb, k)
        with self._lock:
            if not self._slot:
                return base_hits
            scores = np.where(self._live, q_emb @ self._vectors.T, -np.inf)  # (B, capacity); free rows never win
            kk = min(k, len(self._slot))
            top = np.argpartition(-scores, kk - 1, axis=1)[:, :kk]  # (B, kk), unordered
            delta_hits = [[(self._owner[j], float(s[j])) for j in row] for row, s in zip(top, scores, strict=True)]
        return [sorted(b + d, key=lambda h: -h[1])[:k] for b, d in zip(base_hits, delta_hits, strict=True)]

    def _search_base(self, q_emb: np.ndarray, k: int) -> list[Hits]:
        """Base results with the tombstoned ads removed, ``k`` of them per row while the base has them: rows that
        come up short are searched again twice as deep."""
        n = self.base.ntotal
        out: list[Hits] = [[] for _ in range(len(q_emb))]
        todo = np.arange(len(q_emb))
        depth = min(n, k + min(len(self._last), max(k, 16)))
        while len(todo):
            found = self.base.search_ids(q_emb[todo], depth)  # (b, d) -> b lists
            with self._lock:
                kept = [[h for h in hits if h[0] not in self._last][:k] for hits in found]
            short = []
            for i, hits in zip(todo, kept, strict=True):
                out[i] = hits
                if len(hits) < k and depth < n:
                    short.append(i)
            todo, depth = np.array(short, np.int64), min(n, 2 * depth)
        return out

    def status(self) -> dict:
        with self._lock:
            return {"base_position": self.base_position, "upserts": len(self._slot), "tombstones": len(self._last),
                    "applied": self.applied, "refused": self.refused, "last_refusal": self.last_refusal,
                    "last_applied_event": self.last_event,
                    "last_applied_age_s": round(time.time() - self.last_applied_at, 1) if self.last_applied_at
                    else None}
