"""Embedding spaces, their fingerprints, truncation, and embeddings read with their space.

A *space fingerprint* is a short hash of what fixes the geometry of an embedding space: the teacher's
weights, pooling, normalisation, width and query prompt. Ad embeddings carry it, a student records the
space it was aligned to, an index version records the space of its ads, and serving refuses to pair a
student with an index of another space.

A *truncated* space is a space cut to its first d dims and renormalised (`width: truncate`): a student
narrower than its teacher lives in `truncated_space(teacher_space, d)`, and the teacher's vectors are cut
into it with `truncate`. See docs/design.md, "Space fingerprint".
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np

from hlm.data import DataError, read_embeddings


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


# ---------------------------------------------------------------------------------------------- truncation


def truncated_space(space: str, dim: int) -> str:
    """Fingerprint of a space whose vectors are its first `dim` dims, renormalised (ads must be cut the same way)."""
    return hashlib.sha256(f"{space}|truncate|{dim}".encode()).hexdigest()[:16]


def space_at_width(space: str, full_dim: int, dim: int) -> str:
    """The space of `space`'s (`full_dim` wide) vectors seen at width `dim`: itself, or its truncation."""
    return space if dim == full_dim else truncated_space(space, dim)


def truncate(emb: np.ndarray, dim: int) -> np.ndarray:
    """The first `dim` dims of every row, renormalised: (..., D) -> (..., dim); `emb` itself when D == dim.

    A zero row stays zero (its norm is floored at 1e-12, as torch.nn.functional.normalize does).
    """
    if emb.shape[-1] == dim:
        return emb
    part = np.ascontiguousarray(emb[..., :dim])  # (..., dim)
    return part / np.maximum(np.linalg.norm(part, axis=-1, keepdims=True), 1e-12)


# ---------------------------------------------------------------------------------------------- embeddings


class Embeddings(NamedTuple):
    """An embeddings file (`pipelines.embed`) read whole: ids, vectors and the space they belong to."""

    ids: list[str]
    emb: np.ndarray  # (n, D)
    space: str  # fingerprint
    source: Path
    query_prompt: str  # what the model put before each query (ads get none)

    @classmethod
    def read(cls, path: Path) -> Embeddings:
        ids, emb, meta = read_embeddings(path)
        return cls(ids, emb, meta["fingerprint"], path, meta.get("query_prompt") or "")

    def rows_for(self, wanted: list[str]) -> np.ndarray:
        """Rows for `wanted` ids, in that order: (len(wanted), D); an id without an embedding names the file."""
        row = {q: i for i, q in enumerate(self.ids)}
        if missing := [q for q in wanted if q not in row]:
            raise DataError(f"{self.source}: no embedding for {len(missing)} of {len(wanted)} ids "
                            f"(e.g. {missing[:3]})")
        return self.emb[[row[q] for q in wanted]]
