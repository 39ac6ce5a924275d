"""What can go wrong in the index store (hlm.store), and how Redis's own errors become one of these."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import redis


class StoreError(RuntimeError):
    """The index store cannot do what was asked (unknown version, Redis unreachable, …)."""


class PublishError(StoreError):
    """A publish did not complete; ``current`` still points to the previous version."""


class IntegrityError(StoreError):
    """A stored version is incomplete, its bytes do not match the manifest's sha256, or its manifest is unsigned,
    wrongly signed or out of bounds (hlm.manifest)."""


class UnknownVersion(StoreError):
    """Redis answered and the version has no manifest: never published, garbage-collected or deleted."""


class StoreUnavailable(StoreError):
    """Redis did not answer or failed the command: transient, worth retrying."""


@contextmanager
def redis_errors(what: str, error: type[StoreError] = StoreUnavailable) -> Iterator[None]:
    """Re-raise a Redis error inside as ``error`` saying ``what`` failed; a NOPERM says which user may do it."""
    try:
        yield
    except redis.exceptions.NoPermissionError as e:
        raise error(f"{what}: Redis refused it for this user (NOPERM: {e}); serving replicas connect as the "
                    "read-only user, only jobs connect as the writer (docs/cluster.md)") from e
    except redis.RedisError as e:
        raise error(f"{what}: Redis error {type(e).__name__}: {e}") from e
