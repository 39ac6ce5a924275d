"""Embedding spaces and their fingerprints.

A *space fingerprint* is a short hash of what fixes the geometry of an embedding space: the teacher's
weights, pooling, normalisation, width and query prompt. Ad embeddings carry it, a student records the
space it was aligned to, an index version records the space of its ads, and serving refuses to pair a
student with an index of another space.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class Space:
    weights_sha256: str
    pooling: str
    normalize: bool
    dim: int
    query_prompt: str

    @property
    def fingerprint(self) -> str:
        blob = json.dumps(asdict(self), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


class SpaceMismatch(ValueError):
    """Embeddings, a student or an index from different spaces were about to be mixed."""


def check_same_space(expected: str, actual: str, what: str) -> None:
    if expected != actual:
        raise SpaceMismatch(f"{what}: embedding space {actual} does not match the expected space {expected}")
