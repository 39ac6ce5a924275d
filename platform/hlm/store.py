"""Versioned FAISS indexes in Redis: publish, verify, load (rollback and gc: hlm.retention).

Key layout (docs/design.md, "Index store in Redis")::

    hlm:{index}:current                -> version id (moved last, atomically)
    hlm:{index}:versions               -> list of version ids, newest first
    hlm:{index}:v:{ver}:manifest       -> JSON (hlm.manifest): sizes, sha256s, space, …, HMAC signature
    hlm:{index}:v:{ver}:chunk:{i}      -> bytes of faiss.serialize_index, ≤ chunk_bytes each
    hlm:{index}:v:{ver}:ids            -> ad ids (Arrow IPC), position i = FAISS id i
    hlm:{index}:v:{ver}:writing        -> heartbeat of the publish in flight (PX TTL, renewed per chunk)
    hlm:{index}:events                 -> pub/sub channel: the new version id
    hlm:{index}:lease                  -> the nightly job's lease (hlm.lease)

A version is *published* once it is in ``versions``; only then can ``current`` point to it. Publishing
writes the manifest, the chunks and the ids, reads the chunks back to check their sha256, and only then
sets ``current``, pushes onto ``versions`` and publishes the id in one MULTI/EXEC — so a publisher that
fails at any point leaves ``current`` on the previous complete version. That MULTI/EXEC is a compare-and-set:
it commits only if ``current`` is still the version the publish started from, so a late publisher never
undoes a newer publish or an operator's rollback. The next publish removes a killed publish's leftovers
(orphans, hlm.retention) before writing. Readers poll ``current`` (the source of truth); the pub/sub message
is only a hint. With a manifest key (held outside Redis), every manifest is signed and a reader refuses a
version whose manifest is unsigned or wrongly signed. Only bytes and JSON go into Redis, never pickle.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import secrets
from datetime import UTC, datetime

import faiss
import redis

from hlm import manifest as manifests
from hlm import retention
from hlm.index import AdIndex
from hlm.manifest import MAX_INDEX_BYTES, MIB, REDIS_MAX_VALUE, ManifestError, sha256_hex
from hlm.space import check_same_space
from hlm.store_errors import IntegrityError, PublishError, StoreError, StoreUnavailable, UnknownVersion, redis_errors

__all__ = ["IndexStore", "IntegrityError", "PublishError", "StoreError", "StoreUnavailable", "UnknownVersion",
           "new_version"]  # the errors live in hlm.store_errors; callers import them from here
logger = logging.getLogger(__name__)

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")  # no ':' or glob characters: keys and SCAN patterns stay exact
_STARTED = object()  # publish(based_on=…) default: the `current` read when the publish starts


def new_version() -> str:
    """A sortable version id: UTC time to the microsecond plus a short random suffix."""
    return f"{datetime.now(UTC):%Y%m%dT%H%M%S%fZ}-{secrets.token_hex(3)}"


class IndexStore:
    """Versions of one named index in Redis (see the module docstring for the key layout)."""

    def __init__(self, client: redis.Redis, name: str, *, chunk_bytes: int = 64 * MIB, keep: int = 3,
                 heartbeat_s: float = 120.0, signing_key: bytes | None = None,
                 max_index_bytes: int = MAX_INDEX_BYTES) -> None:
        """``signing_key`` (None: ``hlm.manifest.signing_key_from_env()``, a Secret outside Redis) signs every
        manifest published and is required of every manifest read: without one, nothing is signed or checked.
        ``max_index_bytes`` bounds what a manifest may make a reader allocate."""
        if not _NAME.match(name):
            raise ValueError(f"index name {name!r} must match {_NAME.pattern}")
        if not 1 <= chunk_bytes <= REDIS_MAX_VALUE:
            raise ValueError(f"chunk_bytes must be in 1..{REDIS_MAX_VALUE}, got {chunk_bytes}")
        if keep < 1:
            raise ValueError(f"keep must be >= 1, got {keep}")
        if heartbeat_s <= 0:
            raise ValueError(f"heartbeat_s must be > 0, got {heartbeat_s}")
        self.client, self.name, self.chunk_bytes, self.keep = client, name, chunk_bytes, keep
        self.heartbeat_ms = int(heartbeat_s * 1000)  # longer than writing one chunk, or gc takes a live publish
        self.signing_key = signing_key if signing_key is not None else manifests.signing_key_from_env()
        self.max_index_bytes = max_index_bytes
        self.prefix = f"hlm:{name}"
        self.current_key, self.versions_key = f"{self.prefix}:current", f"{self.prefix}:versions"
        self.channel, self.lease_key = f"{self.prefix}:events", f"{self.prefix}:lease"

    # ------------------------------------------------------------------------------------------ keys

    def manifest_key(self, version: str) -> str:
        return f"{self.prefix}:v:{version}:manifest"

    def chunk_key(self, version: str, i: int) -> str:
        return f"{self.prefix}:v:{version}:chunk:{i}"

    def ids_key(self, version: str) -> str:
        return f"{self.prefix}:v:{version}:ids"

    def heartbeat_key(self, version: str) -> str:
        return f"{self.prefix}:v:{version}:writing"

    def _version_keys(self, version: str) -> list[str]:
        """Every key of a version, found by SCAN (so partial writes without a manifest are found too)."""
        return [k.decode() for k in self.client.scan_iter(match=f"{self.prefix}:v:{version}:*", count=1000)]

    # ------------------------------------------------------------------------------------------ reads

    def current(self) -> str | None:
        with redis_errors(f"reading {self.current_key}"):
            value = self.client.get(self.current_key)
        return value.decode() if value is not None else None

    def versions(self) -> list[str]:
        """Published version ids, newest first."""
        with redis_errors(f"reading {self.versions_key}"):
            return [v.decode() for v in self.client.lrange(self.versions_key, 0, -1)]

    def manifest(self, version: str) -> dict:
        """The version's manifest, trusted: signed with this store's key (when it has one), naming this version
        and index, its sizes within bounds (hlm.manifest); IntegrityError otherwise, before any chunk is read."""
        with redis_errors(f"reading the manifest of {self.name} version {version}"):
            raw = self.client.get(self.manifest_key(version))
        if raw is None:
            raise UnknownVersion(f"index {self.name}: no version {version!r} (no {self.manifest_key(version)})")
        try:
            manifest = manifests.parse(raw)
            if self.signing_key is not None:
                manifests.verify(manifest, self.signing_key)
            for name, expected in (("version", version), ("index", self.name)):  # unsigned legacy: no "index"
                if manifest.get(name, expected) != expected:
                    raise ManifestError(f"the manifest is of {name} {manifest[name]!r}, not {expected!r}")
            manifests.check_bounds(manifest, max_bytes=self.max_index_bytes)
        except ManifestError as e:
            raise IntegrityError(f"index {self.name} version {version}: {e}") from e
        return manifest

    # ------------------------------------------------------------------------------------------ publish

    def publish(self, index: AdIndex, *, source: str = "", version: str | None = None,
                based_on: str | None | object = _STARTED, extra: dict | None = None) -> str:
        """Store ``index`` as a new version, verify it, then make it current. Returns the version id.

        ``based_on`` is the version ``current`` must still name at the commit (None: nothing published);
        by default the one current when this call starts. Otherwise the publish is refused and cleaned up.
        ``extra`` adds JSON fields to the manifest (the refresh's ``stream_position``, ``stream_previous``).
        """
        version = version or new_version()
        if not _NAME.match(version):
            raise ValueError(f"version id {version!r} must match {_NAME.pattern}")
        blob, ids_blob = index.to_bytes()
        chunks = [memoryview(blob)[i:i + self.chunk_bytes] for i in range(0, len(blob), self.chunk_bytes)]
        what = f"publishing {self.name} version {version}"
        try:  # within the bounds readers check, signed when this store has a key
            manifest = manifests.describe(index, blob, ids_blob, index_name=self.name, version=version,
                                          chunk_bytes=self.chunk_bytes, source=source, key=self.signing_key,
                                          max_bytes=self.max_index_bytes, extra=extra)
        except ManifestError as e:
            raise PublishError(f"{what}: {e}") from e
        with redis_errors(f"{what} failed; current is unchanged", PublishError):
            if based_on is _STARTED:
                raw = self.client.get(self.current_key)  # not self.current(): a Redis error here is a PublishError
                based_on = raw.decode() if raw is not None else None
            if version.encode() in self.client.lrange(self.versions_key, 0, -1) or self._version_keys(version):
                raise PublishError(f"{what}: version {version!r} already exists")
            retention.delete_orphans(self)  # under noeviction a dead publish's keys would leave no room for this one
            heartbeat = self.heartbeat_key(version)
            try:  # heartbeat, then manifest: every leftover of a failed publish has a manifest (see gc)
                self.client.set(heartbeat, b"1", px=self.heartbeat_ms)
                self.client.set(self.manifest_key(version), json.dumps(manifest, sort_keys=True))
                for i, chunk in enumerate(chunks):  # one SET per chunk: no client-side buffer of the whole blob
                    self.client.set(self.chunk_key(version, i), chunk)
                    self.client.pexpire(heartbeat, self.heartbeat_ms)
                self.client.set(self.ids_key(version), ids_blob)
                self._verify_written(version, manifest)
                self.client.pexpire(heartbeat, self.heartbeat_ms)
            except BaseException:
                self._delete_quietly(version)
                raise
        try:
            self._commit(version, based_on)
        except PublishError:
            self._delete_quietly(version)
            raise
        except redis.RedisError as e:
            try:  # did the EXEC land? Only a confirmed "no" makes the written keys garbage
                landed: bool | None = version.encode() in self.client.lrange(self.versions_key, 0, -1)
            except redis.RedisError:
                landed = None
            if not landed:
                if landed is False:
                    self._delete_quietly(version)
                state = "current is unchanged" if landed is False else "could not check whether it landed"
                raise PublishError(f"{what}: the final MULTI/EXEC failed ({type(e).__name__}: {e}); {state}") from e
            logger.warning("%s: the MULTI/EXEC reply was lost (%s) but the version is published", what, e)
        logger.info("published %s version %s (%d ads, %d bytes in %d chunks, space %s)", self.name, version,
                    index.ntotal, len(blob), len(chunks), index.space)
        return version

    def _verify_written(self, version: str, manifest: dict) -> None:
        """Read the chunks back one at a time and check the sha256 of the whole and of the ids."""
        chunks = (self.client.get(self.chunk_key(version, i)) or b"" for i in range(manifest["n_chunks"]))
        if (sha256_hex(chunks) != manifest["sha256"]
                or sha256_hex([self.client.get(self.ids_key(version)) or b""]) != manifest["ids_sha256"]):
            raise PublishError(f"publishing {self.name} version {version}: the bytes read back do not match "
                               f"the sha256 written; the partial version was deleted")

    def _commit(self, version: str, expected: str | None) -> None:
        """Compare-and-set: SET current, LPUSH versions, PUBLISH, drop the heartbeat in one MULTI/EXEC, only if
        ``current`` is still ``expected`` and this publish's heartbeat is alive (else gc may own its keys)."""
        what = f"publishing {self.name} version {version}"
        heartbeat = self.heartbeat_key(version)

        def flip(pipe: redis.client.Pipeline) -> None:
            if version.encode() in pipe.lrange(self.versions_key, 0, -1):
                return  # our EXEC landed but its reply was lost (redis-py retries that as a WatchError)
            current = pipe.get(self.current_key)
            current = current.decode() if current is not None else None
            if current != expected:
                raise PublishError(f"{what}: current moved from {expected!r} to {current!r} while this publish "
                                   "ran (another publish or a rollback); refusing to overwrite it")
            if not pipe.exists(heartbeat):
                raise PublishError(f"{what}: its heartbeat expired before the commit (a pause longer than "
                                   f"{self.heartbeat_ms} ms), so gc may have removed its keys")
            pipe.multi()
            pipe.set(self.current_key, version)
            pipe.lpush(self.versions_key, version)
            pipe.delete(heartbeat)
            pipe.publish(self.channel, version)

        self.client.transaction(flip, self.current_key, self.versions_key, heartbeat)

    def _delete_quietly(self, version: str) -> None:
        """Best-effort removal of a failed publish's keys (Redis may be the thing that failed)."""
        try:
            keys = self._version_keys(version)
            if keys:
                self.client.delete(*keys)
        except redis.RedisError as e:
            logger.warning("could not delete the partial keys of %s version %s (%s); gc() removes them later",
                           self.name, version, e)

    # ------------------------------------------------------------------------------------------ load

    def load(self, version: str | None = None, *, expected_space: str | None = None) -> AdIndex:
        """Fetch, verify (sha256 before deserialising), check the space and deserialise a version."""
        version = version or self.current()
        if version is None:
            raise StoreError(f"index {self.name}: nothing published yet ({self.current_key} is unset)")
        manifest = self.manifest(version)
        what = f"index {self.name} version {version}"
        if expected_space is not None:
            check_same_space(expected_space, manifest["space"], what)
        blob, ids_blob = self._fetch(version, manifest, what)
        try:
            index = AdIndex.from_bytes(blob, ids_blob)
        except (RuntimeError, ValueError) as e:  # FAISS raises RuntimeError for bytes it cannot read
            raise IntegrityError(f"{what}: passed its sha256 but could not be deserialised (written by faiss "
                                 f"{manifest.get('faiss_version', 'unknown')}, this is faiss {faiss.__version__}): "
                                 f"{e}") from e
        if (index.ntotal, index.dim, index.space) != (manifest["count"], manifest["dim"], manifest["space"]):
            raise IntegrityError(f"{what}: holds {index.ntotal}×{index.dim} in space {index.space}, the manifest "
                                 f"says {manifest['count']}×{manifest['dim']} in space {manifest['space']}")
        return index

    def _fetch(self, version: str, manifest: dict, what: str) -> tuple[bytearray, bytes]:
        """The index bytes, one chunk at a time into one preallocated buffer (peak ≈ one copy plus one chunk,
        not the chunk list plus their join), sha256-checked; then the ids. ``manifest()`` bounded the sizes, so a
        bad manifest cannot make this allocate or fetch without bound."""
        size, n, chunk = manifest["size"], manifest["n_chunks"], manifest["chunk_bytes"]
        buffer, h, pos, missing = bytearray(size), hashlib.sha256(), 0, []
        with redis_errors(f"loading {what}"):
            for i in range(n):
                part = self.client.get(self.chunk_key(version, i))
                if part is None:
                    missing.append(i)
                    continue
                if len(part) != min(chunk, size - i * chunk):
                    raise IntegrityError(f"{what}: chunk {i} holds {len(part)} bytes, the manifest implies "
                                         f"{min(chunk, size - i * chunk)}")
                buffer[pos:pos + len(part)] = part
                h.update(part)
                pos += len(part)
            ids_blob = self.client.get(self.ids_key(version))
        if missing or ids_blob is None:
            lost = f"chunk(s) {missing} of {n}" if missing else "the ad ids"
            raise IntegrityError(f"{what}: {lost} missing from Redis")
        if (sha := h.hexdigest()) != manifest["sha256"]:
            raise IntegrityError(f"{what}: sha256 of its {n} chunk(s) is {sha}, the manifest says "
                                 f"{manifest['sha256']}; refusing to deserialise")
        if sha256_hex([ids_blob]) != manifest["ids_sha256"]:
            raise IntegrityError(f"{what}: the ad ids do not match the manifest's ids_sha256")
        return buffer, ids_blob

    def is_complete(self, version: str) -> bool:
        """Manifest, every chunk and the ids are present (cheap EXISTS; ``load`` also checks the bytes)."""
        try:
            n = self.manifest(version)["n_chunks"]
        except StoreError:
            return False
        keys = [self.chunk_key(version, i) for i in range(n)] + [self.ids_key(version)]
        with redis_errors(f"checking {self.name} version {version}"):
            return self.client.exists(*keys) == len(keys)

    # ------------------------------------------------------------------------------------------ rollback, gc

    def rollback(self, to: str | None = None) -> str:
        """Point ``current`` at ``to`` (default: the version published before the current one) and announce it."""
        return retention.rollback(self, to)

    def gc(self, keep: int | None = None) -> list[str]:
        """Delete versions beyond the newest ``keep`` (never ``current``) and orphans; returns the deleted ids."""
        return retention.gc(self, keep)
