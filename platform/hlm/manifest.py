"""The manifest of a stored index version: its fields, its canonical bytes, its HMAC signature and its bounds.

``hlm.store`` writes one manifest per version (JSON, ``hlm:{index}:v:{ver}:manifest``) before the chunks::

    version, index, space, dim, count, factory, size, n_chunks, chunk_bytes, sha256, ids_sha256,
    created_at, source, format, faiss_version, signature (only when signed)

**What is signed.** With a key, ``signature`` is ``"hmac-sha256:" + HMAC-SHA256(key, canonical_bytes(m)).hex()``,
where ``canonical_bytes`` is the manifest without its ``signature`` field as JSON with sorted keys, no whitespace
and ASCII only. Every other field is covered, among them the sha256 of the index bytes and of the ad ids (so the
signature covers every byte of the version), the version id and the index name (so a signed manifest cannot be
copied under another version or index). sha256 beside the data proves integrity; the key, held outside Redis (a
Kubernetes Secret), proves origin: whoever can write to Redis but does not hold the key cannot make a version a
keyed reader accepts. It does not stop a writer from pointing ``current`` at an older genuinely signed version:
that is what the read-only Redis user of the replicas is for (docs/cluster.md).

**Bounds.** ``size``, ``n_chunks`` and ``chunk_bytes`` decide how much a reader allocates and how many keys it
fetches, so they are checked (types, agreement, limits) before anything is allocated or fetched.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime
from pathlib import Path

import faiss

from hlm.index import AdIndex

MIB, GIB = 1 << 20, 1 << 30
REDIS_MAX_VALUE = 512 * MIB  # Redis's default proto-max-bulk-len: no chunk can be larger
MAX_INDEX_BYTES = 64 * GIB  # far past where docs/design.md moves the blob to object storage
MAX_CHUNKS = 65_536  # 4 TiB at the default 64 MiB chunks; 64 GiB at 1 MiB
SIGNATURE = "signature"
_SCHEME = "hmac-sha256:"
KEY_ENV, KEY_FILE_ENV = "HLM_MANIFEST_KEY", "HLM_MANIFEST_KEY_FILE"
MIN_KEY_BYTES = 32  # `openssl rand -hex 32` gives 64


class ManifestError(ValueError):
    """A manifest is malformed, out of bounds, unsigned or wrongly signed (the message says which field)."""


def sha256_hex(parts: Iterable[bytes | memoryview]) -> str:
    h = hashlib.sha256()
    for part in parts:
        h.update(part)
    return h.hexdigest()


def describe(index: AdIndex, blob: bytes, ids_blob: bytes, *, index_name: str, version: str, chunk_bytes: int,
             source: str, key: bytes | None, max_bytes: int = MAX_INDEX_BYTES, extra: dict | None = None) -> dict:
    """The manifest of ``index`` (``blob, ids_blob = index.to_bytes()``) stored in ``chunk_bytes`` chunks, with the
    JSON fields ``extra`` (the refresh's stream position), signed with ``key`` unless it is None. ManifestError if a
    reader would refuse it for its sizes."""
    if len(ids_blob) > REDIS_MAX_VALUE:
        raise ManifestError(f"the ad ids take {len(ids_blob)} bytes, over Redis's 512 MiB value limit; at this "
                            "scale keep the blob in object storage (docs/design.md)")
    manifest = {
        "version": version, "index": index_name, "space": index.space, "dim": index.dim, "count": index.ntotal,
        "factory": index.factory, "n_chunks": -(-len(blob) // chunk_bytes), "size": len(blob),
        "chunk_bytes": chunk_bytes, "sha256": sha256_hex([blob]), "ids_sha256": sha256_hex([ids_blob]),
        "created_at": datetime.now(UTC).isoformat(), "source": source, "format": 1,
        "faiss_version": faiss.__version__,  # a reader with another FAISS can say why it cannot deserialise
    }
    if clash := manifest.keys() & (extra or {}).keys():
        raise ValueError(f"extra manifest fields {sorted(clash)} would replace the manifest's own")
    manifest.update(extra or {})
    check_bounds(manifest, max_bytes=max_bytes)
    return manifest if key is None else sign(manifest, key)


def signing_key_from_env(environ: Mapping[str, str] = os.environ) -> bytes | None:
    """The manifest key: the file ``$HLM_MANIFEST_KEY_FILE`` names (a mounted Secret), else ``$HLM_MANIFEST_KEY``,
    else None (versions are published unsigned and read unverified). Surrounding whitespace is dropped, so a key
    file written with a trailing newline is the same key."""
    path, value = environ.get(KEY_FILE_ENV), environ.get(KEY_ENV)
    if path and value:
        raise ValueError(f"both ${KEY_FILE_ENV} and ${KEY_ENV} are set; set one")
    if path:
        try:
            key = Path(path).read_bytes().strip()
        except OSError as e:
            raise ValueError(f"${KEY_FILE_ENV}={path}: cannot read the manifest key ({e.strerror})") from e
        where = f"${KEY_FILE_ENV}={path}"
    elif value:
        key, where = value.strip().encode(), f"${KEY_ENV}"
    else:
        return None
    if len(key) < MIN_KEY_BYTES:
        raise ValueError(f"{where}: the manifest key has {len(key)} bytes, at least {MIN_KEY_BYTES} are needed "
                         "(openssl rand -hex 32)")
    return key


def canonical_bytes(manifest: Mapping) -> bytes:
    """What the signature covers: the manifest minus ``signature``, as sorted, compact, ASCII JSON."""
    unsigned = {k: v for k, v in manifest.items() if k != SIGNATURE}
    return json.dumps(unsigned, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def _mac(manifest: Mapping, key: bytes) -> str:
    return _SCHEME + hmac.new(key, canonical_bytes(manifest), hashlib.sha256).hexdigest()


def sign(manifest: Mapping, key: bytes) -> dict:
    """A copy of ``manifest`` with its ``signature``."""
    return {**manifest, SIGNATURE: _mac(manifest, key)}


def verify(manifest: Mapping, key: bytes) -> None:
    """Raise ManifestError unless ``manifest`` carries a signature made with ``key`` (constant-time compare)."""
    signature = manifest.get(SIGNATURE)
    if signature is None:
        raise ManifestError("the manifest is unsigned and this reader requires a signature (a manifest key is "
                            "configured); refusing the version")
    if not isinstance(signature, str) or not hmac.compare_digest(signature.encode(), _mac(manifest, key).encode()):
        raise ManifestError("the manifest's signature does not match (tampered, or signed with another key); "
                            "refusing the version")


def check_bounds(manifest: Mapping, *, max_bytes: int = MAX_INDEX_BYTES) -> None:
    """Raise ManifestError unless ``size``, ``n_chunks`` and ``chunk_bytes`` are integers that agree
    (n_chunks = ceil(size / chunk_bytes)) and stay within ``max_bytes``, ``MAX_CHUNKS`` and Redis's value limit."""
    size, n, chunk = (manifest.get(k) for k in ("size", "n_chunks", "chunk_bytes"))
    if not all(type(v) is int for v in (size, n, chunk)):  # type(): True is an int to isinstance
        raise ManifestError(f"size {size!r}, n_chunks {n!r} and chunk_bytes {chunk!r} must be integers")
    if not 0 < chunk <= REDIS_MAX_VALUE:
        raise ManifestError(f"chunk_bytes {chunk} is outside 1..{REDIS_MAX_VALUE}")
    if not 0 <= size <= max_bytes:
        raise ManifestError(f"size {size} is outside 0..{max_bytes} bytes")
    if not 0 <= n <= MAX_CHUNKS:
        raise ManifestError(f"n_chunks {n} is outside 0..{MAX_CHUNKS}")
    if n != -(-size // chunk):
        raise ManifestError(f"size {size}, n_chunks {n} and chunk_bytes {chunk} do not agree")


def parse(raw: bytes) -> dict:
    """The JSON object in ``raw``; ManifestError if it is not one."""
    try:
        manifest = json.loads(raw)
    except ValueError as e:
        raise ManifestError(f"the manifest is not valid JSON ({e})") from e
    if not isinstance(manifest, dict):
        raise ManifestError("the manifest is not a JSON object")
    return manifest
