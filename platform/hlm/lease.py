"""A lease in Redis so that two runs of one nightly job never work on one index at once.

``SET key token NX PX ttl`` takes it; a daemon thread renews it every third of the TTL while the run is
alive; release deletes it only if the token is still ours. A SIGKILLed run renews nothing, so its lease
runs out on Redis's clock after ``ttl_s`` and the next run can start: no manual unlock, no host clock.
"""

from __future__ import annotations

import logging
import secrets
import threading

import redis

from hlm.store import StoreError, StoreUnavailable

logger = logging.getLogger(__name__)

# Compare-and-act on the token, atomically on the server.
_RENEW = "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('pexpire', KEYS[1], ARGV[2]) end return 0"
_RELEASE = "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) end return 0"


class LeaseHeld(StoreError):
    """Another run holds the lease."""


class Lease:
    def __init__(self, client: redis.Redis, key: str, *, owner: str, ttl_s: float = 60.0) -> None:
        if ttl_s <= 0:
            raise ValueError(f"ttl_s must be > 0, got {ttl_s}")
        self.client, self.key, self.ttl_ms = client, key, int(ttl_s * 1000)
        self.token = f"{owner}:{secrets.token_hex(8)}".encode()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def acquire(self, *, renew: bool = True) -> Lease:
        try:
            taken = self.client.set(self.key, self.token, nx=True, px=self.ttl_ms)
            holder, left_ms = (None, 0) if taken else (self.client.get(self.key), self.client.pttl(self.key))
        except redis.RedisError as e:
            raise StoreUnavailable(f"taking the lease {self.key}: Redis error {type(e).__name__}: {e}") from e
        if not taken:
            raise LeaseHeld(f"{self.key} is held by {holder.decode() if holder else '?'} for up to another "
                            f"{max(left_ms, 0) / 1000:.0f} s: another run is working on this index")
        if renew:
            self._thread = threading.Thread(target=self._renew, name=f"lease-{self.key}", daemon=True)
            self._thread.start()
        return self

    def held(self) -> bool:
        return self.client.get(self.key) == self.token

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.client.eval(_RELEASE, 1, self.key, self.token)

    def _renew(self) -> None:
        while not self._stop.wait(self.ttl_ms / 3000):
            try:
                if not self.client.eval(_RENEW, 1, self.key, self.token, self.ttl_ms):
                    logger.error("lost the lease %s (expired or taken); the publish's compare-and-set still "
                                 "guards current", self.key)
                    return
            except redis.RedisError as e:  # transient: the next renewal may get through before the TTL ends
                logger.warning("could not renew the lease %s: %s", self.key, e)

    def __enter__(self) -> Lease:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()
